"""InRelease verification: the archive is trusted through the recipe's keyring only, and refused loudly."""
from __future__ import annotations

import subprocess

import pytest

from tmplbuild.builder import archive
from tmplbuild.builder.archive import check_freshness, parse_release, verify_inrelease
from tmplbuild.errors import AuthenticityError, ExitCode, FreshnessError
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


# Freshness, as apt checks it: Valid-Until not past, Date not more than 10 s (Acquire::Max-FutureTime) ahead.
DATE = 1783764997  # Sat, 11 Jul 2026 10:16:37 UTC, RELEASE's Date
WEEK = 7 * 86400
URL = "http://127.0.0.1:1/dists/bookworm-security/InRelease"


def with_valid_until(value: str) -> bytes:
    return RELEASE.replace(b"SHA256:", f"Valid-Until: {value}\nSHA256:".encode())


def test_valid_until_is_parsed_and_optional():
    assert parse_release(RELEASE, b"raw").valid_until is None
    assert parse_release(with_valid_until("Sat, 18 Jul 2026 10:16:37 UTC"), b"raw").valid_until == DATE + WEEK
    assert parse_release(with_valid_until("Sat, 18 Jul 2026 12:16:37 +0200"), b"raw").valid_until == DATE + WEEK
    assert parse_release(with_valid_until("Sat, 18 Jul 2026 10:16:37 -0000"), b"raw").valid_until == DATE + WEEK


@pytest.mark.parametrize("value", ["", "soon", "Sat, 32 Jul 2026 10:16:37 UTC", "1783764997"])
def test_malformed_valid_until_is_refused(value):
    with pytest.raises(AuthenticityError, match="archive Release: malformed Valid-Until"):
        parse_release(with_valid_until(value), b"raw")


def test_a_fresh_release_passes():
    info = parse_release(with_valid_until("Sat, 18 Jul 2026 10:16:37 UTC"), b"raw")
    for now in (DATE, DATE + 3600, DATE + WEEK, DATE - archive.MAX_FUTURE_SECONDS):
        check_freshness(info, "bookworm-security", URL, now)
    check_freshness(parse_release(RELEASE, b"raw"), "bookworm", URL, DATE + 400 * 86400)  # no Valid-Until


def test_valid_until_in_the_past_is_refused():
    info = parse_release(with_valid_until("Sat, 18 Jul 2026 10:16:37 UTC"), b"raw")
    with pytest.raises(FreshnessError) as caught:
        check_freshness(info, "bookworm-security", URL, DATE + WEEK + 1)
    assert caught.value.exit_code == ExitCode.FRESHNESS == 4 and caught.value.check == "archive freshness"
    assert str(caught.value) == (
        "archive freshness: bookworm-security: Valid-Until Sat, 18 Jul 2026 10:16:37 UTC is in the past "
        f"(now Sat, 18 Jul 2026 10:16:38 UTC): a replayed or stale archive at {URL}")


def test_date_in_the_future_is_refused_beyond_apts_tolerance():
    info = parse_release(RELEASE, b"raw")
    check_freshness(info, "bookworm", URL, DATE - 10)
    with pytest.raises(FreshnessError) as caught:
        check_freshness(info, "bookworm", URL, DATE - 11)
    message = str(caught.value)
    assert message.startswith("archive freshness: bookworm: Date Sat, 11 Jul 2026 10:16:37 UTC is in the future "
                              "(now Sat, 11 Jul 2026 10:16:26 UTC, 11 s ahead)")
    assert message.endswith(URL) and "\n" not in message


class OneFile:
    def __init__(self, data: bytes) -> None:
        self.data, self.urls = data, []

    def get(self, url: str, cap: int) -> bytes:
        self.urls.append(url)
        return self.data


def test_fetch_release_checks_freshness_after_the_signature(throwaway_key):
    home, _, keyring = throwaway_key
    fetcher = OneFile(clearsign(home, with_valid_until("Sat, 18 Jul 2026 10:16:37 UTC")))
    info = archive.fetch_release(fetcher, "http://127.0.0.1:1", "bookworm-security", keyring, now=DATE + 60)
    assert info.valid_until == DATE + WEEK and fetcher.urls == [URL]
    with pytest.raises(FreshnessError, match=r"^archive freshness: bookworm-security: Valid-Until .* in the past"):
        archive.fetch_release(fetcher, "http://127.0.0.1:1", "bookworm-security", keyring, now=DATE + 2 * WEEK)
    with pytest.raises(FreshnessError, match=r"^archive freshness: bookworm-security: Date .* in the future"):
        archive.fetch_release(fetcher, "http://127.0.0.1:1", "bookworm-security", keyring, now=DATE - 3600)
    # Freshness is checked on verified text only: a forged date never gets that far.
    fetcher.data = fetcher.data.replace(b"18 Jul 2026", b"18 Jul 2036")
    with pytest.raises(AuthenticityError, match="archive signature"):
        archive.fetch_release(fetcher, "http://127.0.0.1:1", "bookworm-security", keyring, now=DATE)
