"""The key strength rule (keys.STRENGTH_RULE): RSA of at least 2048 bits, ECC on ed25519 / NIST / Brainpool
curves, no DSA or ElGamal, for a pinned primary key and for the subkey that signs. Refused when a Verifier is
made (UsageError, exit 2: `remote add`, every later run), when signing, and by `key generate`; real gpg with
throwaway keys (RSA-1024 and DSA-1024 generate in a fraction of a second)."""
from __future__ import annotations

import dataclasses
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import gpg
from tests.test_repo import tmplbuild
from tmplbuild.errors import AuthenticityError, UsageError
from tmplbuild.sign import Signer, Verifier, export_public, generate_key

DATA = b"index: version 7\n"
FAKED_2020 = "20200101T000000!"


@pytest.fixture
def make_key(tmp_path: Path) -> Iterator[Callable[..., tuple[Path, str]]]:
    """make_key(name, algo, usage="sign", *extra gpg options) → (home, primary fingerprint), one home each."""
    homes: list[Path] = []

    def make(name: str, algo: str, usage: str = "sign", *extra: str) -> tuple[Path, str]:
        home = tmp_path / name
        home.mkdir(mode=0o700)
        homes.append(home)
        gpg(home, *extra, "--quick-gen-key", f"{name} <{name}@example.invalid>", algo, usage, "never")
        return home, fingerprints(home)[0]

    yield make
    for home in homes:
        subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "all"], capture_output=True)


def fingerprints(home: Path) -> list[str]:
    listing = gpg(home, "--with-colons", "--list-keys").stdout.decode()
    return [ln.split(":")[9] for ln in listing.splitlines() if ln.startswith("fpr:")]


def refused_at_construction(home: Path, fpr: str) -> str:
    with pytest.raises(UsageError) as info:
        Verifier(export_public(fpr, home, armored=True), [fpr])
    assert info.value.check == "key strength"
    return info.value.message


@pytest.mark.parametrize("algo, shown", [("rsa1024", "RSA 1024 bits"), ("dsa1024", "DSA 1024 bits"),
                                         ("dsa2048", "DSA 2048 bits")])
def test_verifier_refuses_a_weak_pinned_primary_key(make_key, algo: str, shown: str) -> None:
    home, fpr = make_key(algo, algo)
    message = refused_at_construction(home, fpr)
    assert message.startswith(f"pinned key {fpr} is {shown}: ")
    assert "refused whatever their size" in message if algo.startswith("dsa") else "at least 2048 bits" in message


def test_verifier_refuses_a_usable_weak_signing_subkey(make_key) -> None:
    home, primary = make_key("offline", "ed25519", "cert")
    gpg(home, "--quick-add-key", primary, "rsa1024", "sign", "never")
    subkey = fingerprints(home)[1]
    message = refused_at_construction(home, primary)
    assert message.startswith(f"signing subkey {subkey} of pinned key {primary} is RSA 1024 bits: ")
    with pytest.raises(UsageError, match="key strength"):
        Signer(home, primary)


def test_an_expired_weak_subkey_does_not_block_a_strong_key(make_key) -> None:
    """Only a subkey that can still sign counts: an old, expired RSA-1024 subkey next to a current ed25519 one
    is no reason to refuse the key, and gpg signs with the current one."""
    home, primary = make_key("rotated", "ed25519", "cert", "--faked-system-time", FAKED_2020)
    gpg(home, "--faked-system-time", FAKED_2020, "--quick-add-key", primary, "rsa1024", "sign", "1d")
    gpg(home, "--quick-add-key", primary, "ed25519", "sign", "1d")
    old, new = fingerprints(home)[1:]
    signature = Signer(home, primary).sign(DATA, armored=True)
    with Verifier(export_public(primary, home, armored=True), [primary]) as verifier:
        assert verifier.verify(DATA, signature).signer == new
        assert old in verifier._keys  # listed, judged unusable (expired), not weak-and-usable


@pytest.mark.parametrize("algo", ["ed25519", "nistp256", "rsa2048"])
def test_strong_keys_are_accepted(make_key, algo: str) -> None:
    home, fpr = make_key(algo, algo)
    signature = Signer(home, fpr).sign(DATA, armored=False)
    with Verifier(export_public(fpr, home, armored=False), [fpr]) as verifier:
        assert verifier.verify(DATA, signature).fingerprint == fpr


def test_only_pinned_keys_are_judged(make_key) -> None:
    """A weak key that is supplied but not pinned is never trusted, so it is no reason to refuse the others."""
    home, strong = make_key("strong", "ed25519")
    weak_home, weak = make_key("weak", "rsa1024")
    keys = export_public(strong, home, armored=True) + export_public(weak, weak_home, armored=True)
    with Verifier(keys, [strong]) as verifier:
        assert verifier.verify(DATA, Signer(home, strong).sign(DATA, armored=True)).fingerprint == strong


def test_a_weak_key_is_refused_at_verify_time_too(make_key) -> None:
    """Defence in depth: should a weak key's record get past construction, the signature is still refused."""
    home, fpr = make_key("k", "ed25519")
    signature = Signer(home, fpr).sign(DATA, armored=True)
    with Verifier(export_public(fpr, home, armored=True), [fpr]) as verifier:
        verifier._keys[fpr] = dataclasses.replace(verifier._keys[fpr], algo="17", length=1024, curve="")
        with pytest.raises(AuthenticityError, match=f"key {fpr} is DSA 1024 bits: DSA keys are refused"):
            verifier.verify(DATA, signature)


def test_expiry_is_judged_against_the_clock_at_verify_time(make_key, monkeypatch: pytest.MonkeyPatch) -> None:
    """The key listing is made once, at construction; a key that expires between then and a verify is refused
    from the listed expiry time."""
    home, fpr = make_key("soon", "ed25519")
    gpg(home, "--quick-set-expire", fpr, "1d")
    signature = Signer(home, fpr).sign(DATA, armored=True)
    with Verifier(export_public(fpr, home, armored=True), [fpr]) as verifier:
        assert verifier.verify(DATA, signature).fingerprint == fpr
        later = time.time() + 2 * 86400
        monkeypatch.setattr("tmplbuild.sign.verify.time.time", lambda: later)
        with pytest.raises(AuthenticityError, match=f"key {fpr} is expired"):
            verifier.verify(DATA, signature)


def test_signer_refuses_a_weak_key(make_key) -> None:
    home, fpr = make_key("weak", "rsa1024")
    with pytest.raises(UsageError) as info:
        Signer(home, fpr)
    assert info.value.check == "key strength" and "RSA 1024 bits" in info.value.message


@pytest.mark.parametrize("algo", ["rsa1024", "dsa2048", "dsa3072", "elg2048", "rsa", "secp256k1", "default"])
def test_generate_key_never_makes_a_weak_key(tmp_path: Path, algo: str) -> None:
    try:
        with pytest.raises(UsageError) as info:
            generate_key("weak <w@example.invalid>", tmp_path / "never", expire="1d", algo=algo)
        assert info.value.check == "key algorithm" and "ed25519" in info.value.message
        assert not (tmp_path / "never").exists()
    finally:
        subprocess.run(["gpgconf", "--homedir", str(tmp_path / "never"), "--kill", "all"], capture_output=True)


def test_generate_key_accepts_strong_algorithms_in_any_case(tmp_path: Path) -> None:
    home = tmp_path / "g"
    try:
        fpr = generate_key("p256 <p@example.invalid>", home, expire="1d", algo="NISTP256")
        with Verifier(export_public(fpr, home, armored=True), [fpr]) as verifier:
            assert verifier.verify(DATA, Signer(home, fpr).sign(DATA, armored=True)).fingerprint == fpr
    finally:
        subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "all"], capture_output=True)


def test_cli_key_generate_and_remote_add_refuse_weak_keys(make_key, tmp_path: Path) -> None:
    env = {"TMPLBUILD_CONFIG_DIR": str(tmp_path / "config"), "TMPLBUILD_SYSTEM_CONFIG_DIR": str(tmp_path / "etc")}
    generated = tmplbuild("key", "generate", "--name", "w <w@example.invalid>", "--gnupghome", str(tmp_path / "kg"),
                          "--algo", "rsa1024", "--out", str(tmp_path / "kg.asc"), env=env)
    subprocess.run(["gpgconf", "--homedir", str(tmp_path / "kg"), "--kill", "all"], capture_output=True)
    assert generated.returncode == 2, generated.stderr
    assert generated.stderr.startswith("tmplbuild: key algorithm: ") and not (tmp_path / "kg.asc").exists()
    for algo, shown in (("rsa1024", "RSA 1024 bits"), ("dsa1024", "DSA 1024 bits")):
        home, fpr = make_key(algo, algo)
        key_file = tmp_path / f"{algo}.asc"
        key_file.write_bytes(export_public(fpr, home, armored=True))
        proc = tmplbuild("remote", "add", "weak", "https://templates.example.org/repo", "--key", str(key_file),
                         "--fingerprint", fpr, env=env)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"tmplbuild: key strength: pinned key {fpr} is {shown}: ")
        assert not (tmp_path / "config").exists()
    home, fpr = make_key("good", "ed25519")
    key_file = tmp_path / "good.asc"
    key_file.write_bytes(export_public(fpr, home, armored=True))
    ok = tmplbuild("remote", "add", "good", "https://templates.example.org/repo", "--key", str(key_file),
                   "--fingerprint", fpr, env=env)
    assert ok.returncode == 0, ok.stderr


@pytest.mark.parametrize("algo_length_curve, problem", [
    (("1", 2048, ""), None),
    (("1", 2047, ""), "RSA keys need at least 2048 bits"),
    (("3", 1024, ""), "RSA keys need at least 2048 bits"),
    (("17", 3072, ""), "DSA keys are refused whatever their size"),
    (("16", 4096, ""), "ElGamal keys are refused whatever their size"),
    (("22", 255, "ed25519"), None),
    (("19", 256, "brainpoolP256r1"), None),
    (("19", 256, "secp256k1"), "ECC keys must use"),
    (("19", 0, ""), "ECC keys must use"),
    (("99", 4096, ""), "unknown public key algorithm"),
])
def test_strength_rule(algo_length_curve: tuple[str, int, str], problem: str | None) -> None:
    from tmplbuild.sign.keys import KeyRecord, strength_problem

    algo, length, curve = algo_length_curve
    found = strength_problem(KeyRecord("", "", True, "u", "scSC", "", algo=algo, length=length, curve=curve))
    assert found == problem if problem is None else found is not None and found.startswith(problem)
