"""The signing layer against real GnuPG, with throwaway keys under tmp_path (never the user's keyring)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT, gpg
from tmplbuild.errors import AuthenticityError, LocalIOError, UsageError
from tmplbuild.sign import Signer, Verified, Verifier, default_gnupghome, export_public, generate_key
from tmplbuild.sign.keys import check_gnupghome_location, contains_secret_key, list_secret_fingerprints

FAKED_2020 = "20200101T000000!"
DATA = b"index: version 7\n"


@pytest.fixture
def homes(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """Names a GNUPGHOME under tmp_path (not created: generate_key does that) and kills its agents afterwards."""
    made: list[Path] = []

    def home(name: str) -> Path:
        made.append(tmp_path / name)
        return made[-1]

    yield home
    for h in made:
        subprocess.run(["gpgconf", "--homedir", str(h), "--kill", "all"], capture_output=True)


@pytest.fixture
def key(homes: Callable[[str], Path]) -> tuple[Path, str]:
    home = homes("k")
    return home, generate_key("tmplbuild test <test@example.invalid>", home, expire="1d")


def primaries(home: Path, *, secret: bool = False) -> list[str]:
    listing = gpg(home, "--with-colons", "--list-secret-keys" if secret else "--list-keys").stdout.decode()
    return [ln.split(":")[9] for ln in listing.splitlines() if ln.startswith("fpr:")]


def refused(verifier: Verifier, data: bytes, signature: bytes) -> str:
    with pytest.raises(AuthenticityError) as info:
        verifier.verify(data, signature)
    assert info.value.check == "signature"
    return info.value.message


# --- keys ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("armored", [True, False])
def test_generate_and_export_public(key: tuple[Path, str], tmp_path: Path, armored: bool) -> None:
    home, fpr = key
    assert re.fullmatch(r"[0-9A-F]{40}", fpr)
    assert home.stat().st_mode & 0o777 == 0o700
    assert list_secret_fingerprints(home) == [fpr]
    pub = [ln for ln in gpg(home, "--with-colons", "-k").stdout.decode().splitlines() if ln.startswith("pub:")]
    assert pub[0].split(":")[11] == "scSC"  # a signing-only primary key; certifying comes with being primary
    exported = export_public(fpr, home, armored=armored)
    assert exported.startswith(b"-----BEGIN PGP PUBLIC KEY BLOCK-----") == armored
    scratch = tmp_path / "scratch"
    scratch.mkdir(mode=0o700)
    shown = gpg(scratch, "--with-colons", "--show-keys", input=exported).stdout.decode()
    assert f"fpr:::::::::{fpr}:" in shown
    assert not any(ln.startswith(("sec:", "ssb:")) for ln in shown.splitlines())
    assert b"secret" not in gpg(scratch, "--list-packets", input=exported).stdout
    assert not contains_secret_key(exported, scratch)
    subprocess.run(["gpgconf", "--homedir", str(scratch), "--kill", "all"], capture_output=True)


@pytest.mark.parametrize("name, expire", [("a\nKey-Type: rsa", "1d"), ("x" * 200, "1d"), ("  ", "1d"),
                                          ("ok <a@b.invalid>", "2 years"), ("ok <a@b.invalid>", "1d; rm")])
def test_generate_key_validates_before_gpg(tmp_path: Path, name: str, expire: str) -> None:
    with pytest.raises(UsageError):
        generate_key(name, tmp_path / "never", expire=expire)
    assert not (tmp_path / "never").exists()


def test_export_public_refuses_unknown_key(key: tuple[Path, str]) -> None:
    with pytest.raises(UsageError, match="no public key"):
        export_public("0" * 40, key[0], armored=True)


def test_default_gnupghome(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TMPLBUILD_GNUPGHOME", str(tmp_path / "h"))
    assert default_gnupghome() == tmp_path / "h"
    monkeypatch.delenv("TMPLBUILD_GNUPGHOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_gnupghome() == tmp_path / ".local/share/tmplbuild/gnupg"


def test_check_gnupghome_location(tmp_path: Path) -> None:
    project, served = tmp_path / "project", tmp_path / "srv"
    (project / "keys").mkdir(parents=True)
    (tmp_path / "link").symlink_to(project)
    for inside in (project / "keys" / "gnupg", project, tmp_path / "link" / "gnupg", served / "repo" / "gnupg"):
        with pytest.raises(UsageError) as info:
            check_gnupghome_location(inside, [project, served])
        assert info.value.check == "gnupghome"
    check_gnupghome_location(tmp_path / "gnupg", [project, served])
    check_gnupghome_location(tmp_path / "project-gnupg", [project, served])
    # Any git work tree is a project checkout, whatever the current directory: a key home in one is refused, even
    # one not created yet, even through a linked worktree's .git file.
    (tmp_path / "checkout/.git").mkdir(parents=True)
    (tmp_path / "linked").mkdir()
    (tmp_path / "linked/.git").write_text("gitdir: /elsewhere/.git/worktrees/linked\n")
    for inside in (tmp_path / "checkout/keys/gnupg", tmp_path / "linked/gnupg"):
        with pytest.raises(UsageError, match="inside the git work tree"):
            check_gnupghome_location(inside, [])


@pytest.fixture
def short_home():
    """A home directory with a short path: gpg-agent's socket in ~/.local/share/tmplbuild/gnupg must fit a Unix
    socket address (108 bytes), which pytest's tmp_path would overflow."""
    import shutil
    import tempfile

    home = Path(tempfile.mkdtemp(prefix="h", dir="/tmp"))
    yield home
    shutil.rmtree(home, ignore_errors=True)


def test_key_generate_from_the_home_directory_uses_the_default_key_home(short_home: Path) -> None:
    """A new user's first command, run from ~: the default key home is under ~, and that is fine (it is not a
    project); the same command with --gnupghome inside a git checkout is refused from anywhere."""
    tmp_path = short_home
    env = {**os.environ, "HOME": str(tmp_path)}
    env.pop("TMPLBUILD_GNUPGHOME", None)
    run = lambda *a: subprocess.run([sys.executable, "-m", "tmplbuild", "key", "generate", "--name", "Me <me@example.invalid>",  # noqa: E731
                                     "--expire", "1d", *a], cwd=tmp_path, env={**env, "PYTHONPATH": str(ROOT)},
                                    capture_output=True, text=True)
    proc = run()
    try:
        assert proc.returncode == 0, proc.stderr
        fpr = proc.stdout.strip()
        assert (tmp_path / ".local/share/tmplbuild/gnupg").is_dir() and (tmp_path / f"keys/{fpr}.asc").is_file()
        subprocess.run(["git", "init", "-q", str(tmp_path / "project")], check=True)
        refused = run("--gnupghome", str(tmp_path / "project/gnupg"))
        assert refused.returncode == 2 and "inside the git work tree" in refused.stderr, refused.stderr
        assert not (tmp_path / "project/gnupg").exists()
    finally:
        subprocess.run(["gpgconf", "--homedir", str(tmp_path / ".local/share/tmplbuild/gnupg"), "--kill", "all"],
                       capture_output=True)


# --- signing and the happy path ------------------------------------------------------------------------------

@pytest.mark.parametrize("armored", [True, False])
def test_sign_verify_round_trip(key: tuple[Path, str], armored: bool) -> None:
    home, fpr = key
    with Signer(home, fpr.lower()) as signer:
        assert signer.fingerprint == fpr
        signature = signer.sign(DATA, armored=armored)
    assert signature.startswith(b"-----BEGIN PGP SIGNATURE-----") == armored
    assert b"digest algo 8" in gpg(home, "--list-packets", input=signature).stdout  # SHA256
    spaced = " ".join(fpr[i:i + 4] for i in range(0, 40, 4)).lower()
    with Verifier(export_public(fpr, home, armored=not armored), [spaced]) as verifier:
        verified = verifier.verify(DATA, signature)
        assert verified == Verified(fingerprint=fpr, signer=fpr, created=verified.created)
        assert abs(verified.created - time.time()) < 600


def test_sign_and_verify_a_20_mb_file(key: tuple[Path, str], tmp_path: Path) -> None:
    home, fpr = key
    template = tmp_path / "template.tar.zst"
    with open(template, "wb") as out:
        for i in range(20):
            out.write(bytes([i]) * (1 << 20))
    signer = Signer(home, fpr)
    signature = signer.sign_file(template, armored=True)
    with Verifier(export_public(fpr, home, armored=True), [fpr]) as verifier:
        assert verifier.verify_file(template, signature).fingerprint == fpr
        with open(template, "r+b") as f:
            f.seek(15 << 20)
            f.write(b"!")
        with pytest.raises(AuthenticityError, match="bad signature"):
            verifier.verify_file(template, signature)
        with pytest.raises(LocalIOError):
            verifier.verify_file(tmp_path / "missing", signature)
    with pytest.raises(LocalIOError):
        signer.sign_file(tmp_path / "missing", armored=True)


def test_verifier_removes_its_home(key: tuple[Path, str]) -> None:
    home, fpr = key
    verifier = Verifier(export_public(fpr, home, armored=True), [fpr])
    private = verifier._home
    assert private.is_dir() and private.stat().st_mode & 0o777 == 0o700
    verifier.close()
    verifier.close()
    assert not private.exists()


# --- refusals ------------------------------------------------------------------------------------------------

def test_refuses_tampered_data(key: tuple[Path, str]) -> None:
    home, fpr = key
    signature = Signer(home, fpr).sign(DATA, armored=True)
    with Verifier(export_public(fpr, home, armored=True), [fpr]) as verifier:
        assert refused(verifier, DATA + b" ", signature) == "bad signature (data changed since it was signed)"


def test_refuses_known_but_unpinned_and_unknown_keys(homes: Callable[[str], Path]) -> None:
    home = homes("two")
    pinned = generate_key("pinned <p@example.invalid>", home, expire="1d")
    other = generate_key("other <o@example.invalid>", home, expire="1d")
    signature = Signer(home, other).sign(DATA, armored=False)
    both = export_public(pinned, home, armored=False) + export_public(other, home, armored=True)  # mixed forms
    with Verifier(both, [pinned]) as verifier:
        message = refused(verifier, DATA, signature)
    assert message == f"signed by {other}, which is not pinned (pinned: {pinned})"
    with Verifier(export_public(pinned, home, armored=True), [pinned]) as verifier:
        message = refused(verifier, DATA, signature)
    assert message.startswith("signed by unknown key ") and other[-16:] in message
    assert message.endswith(f"which is not pinned (pinned: {pinned})")


def test_refuses_expired_key(homes: Callable[[str], Path]) -> None:
    home = homes("old")
    home.mkdir(mode=0o700)
    gpg(home, "--faked-system-time", FAKED_2020, "--quick-gen-key", "old <old@example.invalid>", "ed25519", "sign",
        "1d")
    (fpr,) = primaries(home)
    signature = gpg(home, "--faked-system-time", FAKED_2020, "-u", fpr, "--detach-sign", "-o", "-",
                    input=DATA).stdout
    with Verifier(export_public(fpr, home, armored=True), [fpr]) as verifier:
        assert refused(verifier, DATA, signature) == f"key {fpr} is expired"
    with pytest.raises(UsageError, match="expired"):
        Signer(home, fpr)


def test_refuses_key_revoked_after_signing(key: tuple[Path, str]) -> None:
    home, fpr = key
    signature = Signer(home, fpr).sign(DATA, armored=True)
    with Verifier(export_public(fpr, home, armored=True), [fpr]) as verifier:
        assert verifier.verify(DATA, signature).fingerprint == fpr
    # gpg --gen-revoke insists on a tty; the certificate gpg stored at generation is the same thing, with its
    # armor line prefixed by ":" against accidental import.
    certificate = (home / "openpgp-revocs.d" / f"{fpr}.rev").read_bytes().replace(b":-----BEGIN", b"-----BEGIN")
    gpg(home, "--import", input=certificate)
    with Verifier(export_public(fpr, home, armored=True), [fpr]) as verifier:
        assert refused(verifier, DATA, signature) == f"key {fpr} is revoked"
    with pytest.raises(UsageError, match="revoked"):
        Signer(home, fpr)


def test_refuses_two_signatures(homes: Callable[[str], Path]) -> None:
    home = homes("two")
    first = generate_key("one <1@example.invalid>", home, expire="1d")
    second = generate_key("two <2@example.invalid>", home, expire="1d")
    signature = gpg(home, "-u", first, "-u", second, "--detach-sign", "-o", "-", input=DATA).stdout
    keys = export_public(first, home, armored=True) + export_public(second, home, armored=True)
    with Verifier(keys, [first, second]) as verifier:
        assert refused(verifier, DATA, signature) == "2 signatures, expected exactly 1"


@pytest.mark.parametrize("signature", [b"", b"garbage\n", b"-----BEGIN PGP SIGNATURE-----\n\nAAAA\n"])
def test_refuses_empty_or_garbage_signature(key: tuple[Path, str], signature: bytes) -> None:
    home, fpr = key
    with Verifier(export_public(fpr, home, armored=True), [fpr]) as verifier:
        assert refused(verifier, DATA, signature) == "no signature found"


def test_refuses_signature_that_is_not_detached(key: tuple[Path, str]) -> None:
    home, fpr = key
    attached = gpg(home, "-u", fpr, "--sign", "-o", "-", input=b"other data").stdout
    with Verifier(export_public(fpr, home, armored=True), [fpr]) as verifier:
        refused(verifier, DATA, attached)
        refused(verifier, b"other data", attached)


def test_verifier_refuses_pinned_key_not_supplied(key: tuple[Path, str]) -> None:
    home, fpr = key
    public = export_public(fpr, home, armored=True)
    with pytest.raises(UsageError, match=f"pinned fingerprint {'A' * 40} is not among .*found: {fpr}"):
        Verifier(public, [fpr, "A" * 40])
    for bad in (["not-hex"], ["A" * 39], []):
        with pytest.raises(UsageError):
            Verifier(public, bad)
    with pytest.raises(UsageError):
        Verifier(b"", [fpr])


@pytest.mark.parametrize("armored", [True, False])
def test_verifier_refuses_secret_key_material(key: tuple[Path, str], armored: bool, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    home, fpr = key
    secret = gpg(home, "--export-secret-keys", *(["--armor"] if armored else []), fpr).stdout
    # A temporary directory of its own: other processes' verifiers come and go in /tmp meanwhile.
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "tmp"))
    for material in (secret, export_public(fpr, home, armored=True) + secret):
        with pytest.raises(UsageError, match="secret key"):
            Verifier(material, [fpr])
    assert not os.listdir(tmp_path / "tmp")


def test_signer_refuses_unknown_or_malformed_fingerprint(key: tuple[Path, str], tmp_path: Path) -> None:
    home, fpr = key
    with pytest.raises(UsageError, match="no secret key"):
        Signer(home, "B" * 40)
    with pytest.raises(UsageError):
        Signer(home, fpr[:-1])
    with pytest.raises(UsageError):
        Signer(tmp_path / "absent", fpr)


def test_refuses_weak_digest(key: tuple[Path, str]) -> None:
    home, fpr = key
    signature = gpg(home, "-u", fpr, "--digest-algo", "SHA1", "--detach-sign", "-o", "-", input=DATA).stdout
    with Verifier(export_public(fpr, home, armored=True), [fpr]) as verifier:
        assert refused(verifier, DATA, signature).startswith(f"signature by {fpr} uses digest SHA1, expected")


def test_signing_subkey(homes: Callable[[str], Path]) -> None:
    home = homes("sub")
    home.mkdir(mode=0o700)
    gpg(home, "--quick-gen-key", "offline <off@example.invalid>", "ed25519", "cert", "1d")
    (primary,) = primaries(home)
    gpg(home, "--quick-add-key", primary, "ed25519", "sign", "1d")
    subkey = [ln.split(":")[9] for ln in gpg(home, "--with-colons", "-k").stdout.decode().splitlines()
              if ln.startswith("fpr:")][1]
    signature = Signer(home, primary).sign(DATA, armored=True)
    with Verifier(export_public(primary, home, armored=False), [primary]) as verifier:
        verified = verifier.verify(DATA, signature)
        assert (verified.fingerprint, verified.signer) == (primary, subkey)
        with pytest.raises(UsageError, match="not among"):
            Verifier(export_public(primary, home, armored=False), [subkey])  # pins name primary keys only


# --- garbage signatures over large data: always a refusal, never an internal error -----------------------------

def garbage_signatures(home: Path, fpr: str, data: bytes) -> dict[str, bytes]:
    """Signature files gpg gives up on before reading all the data: it exits while the data is still being
    written to its stdin (python-gnupg's copier thread then met EPIPE, and the BrokenPipeError surfaced as an
    internal error, exit 1, whenever the thread had noticed before gpg's output was collected)."""
    real = Signer(home, fpr).sign(data, armored=False)
    return {
        "empty": b"",
        "public key block": export_public(fpr, home, armored=True),
        "random bytes": os.urandom(4096),
        "truncated signature packet": real[:len(real) // 2],
        "huge": os.urandom(8 << 20),
    }


def test_garbage_signatures_over_large_data_are_refused_every_time(key: tuple[Path, str], tmp_path: Path) -> None:
    home, fpr = key
    data = os.urandom(6 << 20)  # far more than a pipe holds: gpg exits with most of it unread
    path = tmp_path / "data"
    path.write_bytes(data)
    garbage = garbage_signatures(home, fpr, data)
    with Verifier(export_public(fpr, home, armored=True), [fpr]) as verifier:
        for _ in range(30):
            for name, signature in garbage.items():
                with pytest.raises(AuthenticityError) as info:
                    verifier.verify(data, signature)
                assert info.value.check == "signature", name
        for name, signature in garbage.items():
            with pytest.raises(AuthenticityError):
                verifier.verify_file(path, signature)


def test_verifier_runs_few_gpg_processes_and_no_gpgconf(key: tuple[Path, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """A client verifies on every fetch: python-gnupg's version probe, one --list-packets, one --import and one
    listing at construction, one --verify per signature; no second listing, no gpgconf --kill (no agent is
    ever started)."""
    home, fpr = key
    public, signature = export_public(fpr, home, armored=True), Signer(home, fpr).sign(DATA, armored=True)
    launched: list[str] = []
    original = subprocess.Popen._execute_child

    def counting(self, args, *rest, **kw):  # type: ignore[no-untyped-def]
        launched.append(" ".join(map(str, args)) if isinstance(args, (list, tuple)) else str(args))
        return original(self, args, *rest, **kw)

    monkeypatch.setattr(subprocess.Popen, "_execute_child", counting)
    with Verifier(public, [fpr]) as verifier:
        assert len(launched) <= 4, launched
        launched.clear()
        verifier.verify(DATA, signature)
        verifier.verify(DATA, signature)
        assert len(launched) == 2, launched
    assert not [cmd for cmd in launched if "gpgconf" in cmd], launched


def test_cli_refuses_garbage_index_signatures_with_exit_3_every_time(key: tuple[Path, str], tmp_path: Path) -> None:
    """The client path: `tmplbuild list` fetches a several-MB index.json and a garbage index.json.asc (twice:
    a failed pair is fetched once more) and must exit 3 with one line, never 1 (internal error)."""
    from tests.test_client import CLIENT, Server

    home, fpr = key
    data = os.urandom(3 << 20)
    garbage = garbage_signatures(home, fpr, data)
    del garbage["huge"]  # above the client's signature size cap: refused before gpg sees it (also exit 3)
    pub = tmp_path / "pub.asc"
    pub.write_bytes(export_public(fpr, home, armored=True))
    (tmp_path / "repo").mkdir()
    server = Server(tmp_path / "repo")
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower() and k != "GNUPGHOME"}
    env.update(TMPLBUILD_CONFIG_DIR=str(tmp_path / "config"), TMPLBUILD_SYSTEM_CONFIG_DIR=str(tmp_path / "etc"),
               TMPLBUILD_STATE_DIR=str(tmp_path / "state"), NO_PROXY="*")
    try:
        names = sorted(garbage)
        for i in range(30):
            name = names[i % len(names)]
            server.override = {"index.json": data, "index.json.asc": garbage[name]}
            proc = subprocess.run([*CLIENT, "list", "--url", server.url, "--key", str(pub), "--fingerprint", fpr],
                                  capture_output=True, text=True, env=env, timeout=120)
            lines = proc.stderr.strip().splitlines()
            assert proc.returncode == 3 and len(lines) == 1, (name, proc.returncode, proc.stderr)
            assert lines[0].startswith("tmplbuild: signature: "), (name, proc.stderr)
    finally:
        server.stop()
