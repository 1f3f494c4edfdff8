from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

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
