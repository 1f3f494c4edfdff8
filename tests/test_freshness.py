"""`tmplbuild build` refuses a stale or future-dated archive, per suite, before it downloads a single package:
a local archive, clearsigned by a throwaway key, served over HTTP on 127.0.0.1, and the real CLI."""
from __future__ import annotations

import hashlib
import os
import shutil
import threading
import time
from email.utils import formatdate
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.conftest import gpg
from tests.test_build import assert_nothing_left, build

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="tmplbuild build needs root")

DAY = 86400
RECIPE = """
[template]
name = "freshness"
distribution = "debian"
release = "12"
suite = "bookworm"
variant = "minimal"
architectures = ["amd64"]
description = "freshness test"

[bootstrap]
variant = "minbase"
components = ["main"]
extra_suites = ["bookworm-security"]
keyring = "{keyring}"
mirror = "{url}"
security_mirror = "{url}"
"""
PACKAGES = b"Package: base-files\nVersion: 12.4\nArchitecture: amd64\n\n"


def debian_date(t: float) -> str:
    """RFC 2822 in UTC, as the Debian archive writes Date and Valid-Until."""
    return formatdate(t, usegmt=True).replace("GMT", "UTC")


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def archive(tmp_path):
    """A served, empty archive directory; yields (directory, URL)."""
    root = tmp_path / "archive"
    root.mkdir()
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join()


def publish(root: Path, home: Path, suite: str, date: float, valid_until: float | None) -> None:
    """dists/SUITE/InRelease, clearsigned, listing a Packages index that is not there: a build that got past
    the archive step would fail on it with exit 5, so an exit 4 can only come from the freshness check."""
    fields = [f"Origin: Debian\nSuite: {suite}\nCodename: {suite}\nDate: {debian_date(date)}\n"]
    if valid_until is not None:
        fields.append(f"Valid-Until: {debian_date(valid_until)}\n")
    fields.append(f"Architectures: amd64\nComponents: main\nSHA256:\n"
                  f" {hashlib.sha256(PACKAGES).hexdigest()} {len(PACKAGES)} main/binary-amd64/Packages\n")
    path = root / "dists" / suite / "InRelease"
    path.parent.mkdir(parents=True)
    path.write_bytes(gpg(home, "--clearsign", input="".join(fields).encode()).stdout)


def run_build(tmp_path: Path, url: str, keyring: Path, monkeypatch) -> tuple[int, str, Path, Path]:
    """The real CLI on a bookworm + bookworm-security recipe trusting only the throwaway keyring. The recipe
    is its own, not a copy of a shipped one: nothing after the archive step may matter here."""
    recipe = tmp_path / "recipes/freshness.toml"
    recipe.parent.mkdir(parents=True)
    shutil.copy(keyring, recipe.parent / keyring.name)  # a recipe's inputs must be inside its directory
    recipe.write_text(RECIPE.format(keyring=keyring.name, url=url))
    for name in ("TMPLBUILD_MIRROR", "TMPLBUILD_SECURITY_MIRROR", "SOURCE_DATE_EPOCH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TMPLBUILD_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("TMPLBUILD_SYSTEM_CONFIG_DIR", str(tmp_path / "etc"))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    out, cache = tmp_path / "out", tmp_path / "cache"
    proc = build(recipe, out, cache)
    return proc.returncode, proc.stderr, out, cache


def last_line(stderr: str) -> str:
    return stderr.strip().splitlines()[-1]


def assert_refused_before_any_download(out: Path, cache: Path) -> None:
    assert_nothing_left(out, cache)
    assert not (cache / "debs").exists() and not (cache / "indices").exists()


def test_past_valid_until_of_the_security_suite_fails_with_exit_4(tmp_path, throwaway_key, archive, monkeypatch):
    home, _, keyring = throwaway_key
    root, url = archive
    now = int(time.time())
    publish(root, home, "bookworm", now - 3600, now + 7 * DAY)
    stale = now - 3 * DAY
    publish(root, home, "bookworm-security", now - 10 * DAY, stale)  # a replayed, once valid, security archive
    code, stderr, out, cache = run_build(tmp_path, url, keyring, monkeypatch)
    assert code == 4, stderr
    last = last_line(stderr)
    assert last.startswith("tmplbuild: archive freshness: bookworm-security: Valid-Until "), stderr
    assert debian_date(stale) in last and "is in the past" in last
    assert f"{url}/dists/bookworm-security/InRelease" in last
    assert "bookworm: Release of" in stderr  # the main suite was read and accepted first
    assert_refused_before_any_download(out, cache)


def test_future_date_of_the_main_suite_fails_with_exit_4(tmp_path, throwaway_key, archive, monkeypatch):
    home, _, keyring = throwaway_key
    root, url = archive
    now = int(time.time())
    ahead = now + 3600  # a clock an hour behind, or an archive dated to outlive its time
    publish(root, home, "bookworm", ahead, ahead + 7 * DAY)
    publish(root, home, "bookworm-security", now - 3600, now + 7 * DAY)
    code, stderr, out, cache = run_build(tmp_path, url, keyring, monkeypatch)
    assert code == 4, stderr
    last = last_line(stderr)
    assert last.startswith(f"tmplbuild: archive freshness: bookworm: Date {debian_date(ahead)} "
                           "is in the future"), stderr
    assert f"{url}/dists/bookworm/InRelease" in last
    assert_refused_before_any_download(out, cache)


def test_a_fresh_archive_passes_the_freshness_check(tmp_path, throwaway_key, archive, monkeypatch):
    # The control: the same fixture, fresh, gets past the archive step and fails only on the missing index.
    home, _, keyring = throwaway_key
    root, url = archive
    now = int(time.time())
    publish(root, home, "bookworm", now - 3600, now + 7 * DAY)
    publish(root, home, "bookworm-security", now - 3600, None)  # no Valid-Until: accepted, as apt does
    code, stderr, out, cache = run_build(tmp_path, url, keyring, monkeypatch)
    assert code == 5, stderr
    assert "archive freshness" not in stderr and "bookworm-security: Release of" in stderr
    assert last_line(stderr).startswith("tmplbuild: http: ") and "main/binary-amd64/Packages" in stderr
    assert_nothing_left(out, cache)
