"""InRelease verification: the archive is trusted through the recipe's keyring only, and refused loudly."""
from __future__ import annotations

import subprocess

import pytest

from tmplbuild.build.archive import parse_release, verify_inrelease
from tmplbuild.errors import AuthenticityError
from tests.conftest import gpg

RELEASE = b"""Origin: Test
Suite: stable
Codename: bookworm
Date: Sat, 11 Jul 2026 10:16:37 UTC
SHA256:
 0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef 1234 main/binary-amd64/Packages
"""


def clearsign(home, data: bytes, *extra: str) -> bytes:
    return gpg(home, *extra, "--clearsign", input=data).stdout


def test_good_signature_gives_the_signed_text(throwaway_key):
    home, _, keyring = throwaway_key
    signed = verify_inrelease(clearsign(home, RELEASE), keyring, "test")
    info = parse_release(signed, b"raw")
    assert info.codename == "bookworm" and info.epoch == 1783764997
    assert info.files["main/binary-amd64/Packages"] == ("0123456789abcdef" * 4, 1234)


def test_tampered_text_is_refused(throwaway_key):
    home, _, keyring = throwaway_key
    data = clearsign(home, RELEASE).replace(b"Codename: bookworm", b"Codename: bookwarm")
    with pytest.raises(AuthenticityError, match="archive signature"):
        verify_inrelease(data, keyring, "test")


def test_signature_by_a_key_outside_the_keyring_is_refused(throwaway_key, tmp_path):
    _, _, keyring = throwaway_key
    other = tmp_path / "other"
    other.mkdir(mode=0o700)
    try:
        gpg(other, "--quick-gen-key", "other <o@example.invalid>", "ed25519", "sign", "1d")
        data = clearsign(other, RELEASE)
    finally:
        subprocess.run(["gpgconf", "--homedir", str(other), "--kill", "all"], capture_output=True)
    with pytest.raises(AuthenticityError, match="archive signature"):
        verify_inrelease(data, keyring, "test")


def test_unsigned_text_is_refused(throwaway_key):
    with pytest.raises(AuthenticityError):
        verify_inrelease(RELEASE, throwaway_key[2], "test")


def test_signature_by_an_expired_key_is_refused(tmp_path):
    # A key made and used in 2020 that expired the next day: the signature is good, the key is not.
    home = tmp_path / "expired"
    home.mkdir(mode=0o700)
    then = ("--faked-system-time", "20200101T000000!")
    gpg(home, *then, "--quick-gen-key", "old <old@example.invalid>", "ed25519", "sign", "1d")
    data = clearsign(home, RELEASE, *then)
    keyring = tmp_path / "old.gpg"
    keyring.write_bytes(gpg(home, "--export").stdout)
    subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "all"], capture_output=True)
    with pytest.raises(AuthenticityError, match="archive signature"):
        verify_inrelease(data, keyring, "test")
