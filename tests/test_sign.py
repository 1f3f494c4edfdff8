"""The signing layer against real GnuPG, with throwaway keys under tmp_path (never the user's keyring)."""
from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import gpg
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
def test_verifier_refuses_secret_key_material(key: tuple[Path, str], armored: bool) -> None:
    home, fpr = key
    secret = gpg(home, "--export-secret-keys", *(["--armor"] if armored else []), fpr).stdout
    before = set(os.listdir("/tmp"))
    for material in (secret, export_public(fpr, home, armored=True) + secret):
        with pytest.raises(UsageError, match="secret key"):
            Verifier(material, [fpr])
    assert not {n for n in set(os.listdir("/tmp")) - before if n.startswith("tmplbuild-verify-")}


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
