from __future__ import annotations

import errno
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tmplbuild.repo import root as rootdoc
from tmplbuild.repo.root import Role
from tmplbuild.sign import Signer, export_public

ROOT = Path(__file__).resolve().parent.parent


def recipe_dir(path: Path) -> Path:
    """A directory for test recipes made from a shipped recipe's text: its `files/` a copy of the shipped ones
    (not a symlink: a recipe's inputs must resolve inside its own directory)."""
    path.mkdir(parents=True, exist_ok=True)
    if not (path / "files").exists():
        shutil.copytree(ROOT / "recipes/files", path / "files", symlinks=True)
    return path


def gpg(home: Path, *args: str, input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["gpg", "--homedir", str(home), "--batch", "--yes", "--pinentry-mode", "loopback",
                           "--passphrase", "", *args], input=input, capture_output=True, check=True)


@pytest.fixture
def throwaway_key(tmp_path: Path):
    """A fresh ed25519 signing key in its own GNUPGHOME; yields (home, fingerprint, binary keyring path)."""
    home = tmp_path / "gnupg"
    home.mkdir(mode=0o700)
    gpg(home, "--quick-gen-key", "tmplbuild test <test@example.invalid>", "ed25519", "sign", "1d")
    fpr = [ln.split(":")[9] for ln in gpg(home, "--with-colons", "--list-keys").stdout.decode().splitlines()
           if ln.startswith("fpr:")][0]
    keyring = tmp_path / "pub.gpg"
    keyring.write_bytes(gpg(home, "--export", fpr).stdout)
    yield home, fpr, keyring
    subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "all"], capture_output=True)


def can_build() -> str | None:
    """Why real builds cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root"
    if not shutil.which("debootstrap"):
        return "debootstrap not installed"
    return None


NAMES = ("root-a", "root-b", "root-c", "root-d", "online-1", "online-2", "thief")


@pytest.fixture(scope="session")
def keys(tmp_path_factory):
    """Seven ed25519 keys in one throwaway GNUPGHOME: name -> fingerprint; plus the home and armored keys (made
    once for every module that tests roots)."""
    home = tmp_path_factory.mktemp("rootkeys") / "gnupg"
    home.mkdir(mode=0o700)
    fprs = {}
    for name in NAMES:
        gpg(home, "--quick-gen-key", f"{name} <{name}@example.invalid>", "ed25519", "sign", "1y")
        listing = gpg(home, "--with-colons", "--list-keys", f"{name}@example.invalid").stdout.decode()
        fprs[name] = [ln.split(":")[9] for ln in listing.splitlines() if ln.startswith("fpr:")][0]
    armored = {f: export_public(f, home, armored=True) for f in fprs.values()}
    yield Keys(home, fprs, armored)
    subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "all"], capture_output=True)


class Keys:
    def __init__(self, home: Path, fprs: dict[str, str], armored: dict[str, bytes]) -> None:
        self.home, self.fprs, self.armored = home, fprs, armored

    def __getitem__(self, name: str) -> str:
        return self.fprs[name]

    def sign(self, data: bytes, *names: str) -> bytes:
        out = b""
        for name in names:
            with Signer(self.home, self.fprs[name]) as signer:
                out += signer.sign(data, armored=True)
        return out

    def root(self, version: int, root: tuple[str, ...], online: tuple[str, ...], threshold: int = 1,
             online_threshold: int = 1, expires_in: int = 86400, now: float | None = None,
             repo_id: str = "test-repo") -> bytes:
        fprs = [self.fprs[n] for n in (*root, *online)]
        return rootdoc.render(repo_id, version, {f: self.armored[f] for f in fprs},
                              Role(tuple(self.fprs[n] for n in root), threshold),
                              Role(tuple(self.fprs[n] for n in online), online_threshold), expires_in, now)


def signed_suite(root: Path, home: Path, packages: bytes, architectures: str = "amd64") -> None:
    """dists/test/{InRelease,main/binary-amd64/Packages} under `root`: the Packages index `packages`, named with
    its sha256 in a Release clearsigned by the key in `home` (a local apt archive the tests point a build at)."""
    from email.utils import formatdate

    index = root / "dists/test/main/binary-amd64/Packages"
    index.parent.mkdir(parents=True)
    index.write_bytes(packages)
    release = (f"Origin: tmplbuild-test\nSuite: test\nCodename: test\nDate: {formatdate(usegmt=True)}\n"
               f"Architectures: {architectures}\nComponents: main\nSHA256:\n"
               f" {hashlib.sha256(packages).hexdigest()} {len(packages)} main/binary-amd64/Packages\n").encode()
    (root / "dists/test/InRelease").write_bytes(gpg(home, "--clearsign", input=release).stdout)


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs (needs root and mount(8)); unmounted at the end."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0755", "tmpfs", str(mnt)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def fill(disk: Path, leave: int = 0) -> Path:
    """Fill `disk` up, then give `leave` bytes back."""
    filler = disk / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * (64 << 10))
                f.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    if leave:
        os.truncate(filler, max(0, filler.stat().st_size - leave))
    return filler


def previous_tmplbuild(tmp_path_factory, commit: str) -> Path:
    """An earlier tmplbuild's source (tmplbuild/ and repo_server/ at `commit`, from this repository's history),
    to run with PYTHONPATH pointing at it: how a repository with new data reads to the previous release."""
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: the previous release's source is not at hand")
    dest = tmp_path_factory.mktemp("previous")
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit, "tmplbuild", "repo_server"],
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest
