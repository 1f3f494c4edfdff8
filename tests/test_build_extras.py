"""Real builds of the less common paths: an extra apt repository trusted through its own key, served over
HTTP on 127.0.0.1, and a build interrupted half-way."""
from __future__ import annotations

import hashlib
import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, can_build, gpg, recipe_dir, signed_suite
from tests.test_build import MINIMAL, assert_nothing_left, build, only, unpack

pytestmark = [pytest.mark.build, pytest.mark.skipif(can_build() is not None, reason=str(can_build()))]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def signed_repo(repo: Path, home: Path) -> None:
    """A one-package apt repository: dists/test/{InRelease,main/binary-amd64/Packages} and its pool."""
    pkg = repo.parent / "pkg"
    (pkg / "DEBIAN").mkdir(parents=True)
    (pkg / "usr/share/tmplbuild-hello").mkdir(parents=True)
    (pkg / "usr/share/tmplbuild-hello/hello").write_text("hello from a signed repository\n")
    (pkg / "DEBIAN/control").write_text("Package: tmplbuild-hello\nVersion: 1.0\nArchitecture: all\n"
                                        "Maintainer: Test <test@example.invalid>\nDescription: test package\n")
    deb = repo / "pool/tmplbuild-hello_1.0_all.deb"
    deb.parent.mkdir(parents=True)
    subprocess.run(["dpkg-deb", "--root-owner-group", "-Zgzip", "--build", str(pkg), str(deb)], check=True,
                   capture_output=True)
    data = deb.read_bytes()
    packages = (f"Package: tmplbuild-hello\nVersion: 1.0\nArchitecture: all\nMaintainer: Test <test@example.invalid>\n"
                f"Filename: pool/{deb.name}\nSize: {len(data)}\nSHA256: {hashlib.sha256(data).hexdigest()}\n"
                f"Description: test package\n\n").encode()
    signed_suite(repo, home, packages, architectures="amd64 all")


@pytest.fixture
def served_repo(tmp_path, throwaway_key):
    home, fpr, _ = throwaway_key
    repo = tmp_path / "repo"
    signed_repo(repo, home)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port),
                               "--directory", str(repo)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    key = tmp_path / "recipes/repo.asc"
    key.parent.mkdir(parents=True)
    key.write_bytes(gpg(home, "--armor", "--export", fpr).stdout)
    yield f"http://127.0.0.1:{port}", key
    server.terminate()
    server.wait()


def repo_recipe(tmp_path: Path, url: str, key: Path) -> Path:
    recipe = recipe_dir(tmp_path / "recipes") / "withrepo.toml"
    recipe.write_text(MINIMAL.replace('name = "debian-12-minimal"', 'name = "withrepo"') + f"""
[[repositories]]
name = "local"
uris = ["{url}/"]
suites = ["test"]
components = ["main"]
key = "{key.name}"
packages = ["tmplbuild-hello"]
""")
    return recipe


def test_extra_repository_is_used_through_its_own_key(cache, tmp_path, served_repo):
    url, key = served_repo
    out = tmp_path / "out"
    proc = build(repo_recipe(tmp_path, url, key), out, cache)
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads(only(out, "*.manifest.json").read_text())
    # A package the recipe repository brought: its .deb's sha256 and URI from the apt lists apt verified in the
    # tree (it is not in the build's own plan), and NOASSERTION for a package without a copyright file.
    deb = tmp_path / "repo/pool/tmplbuild-hello_1.0_all.deb"
    assert {"name": "tmplbuild-hello", "version": "1.0", "arch": "all", "installed_size_kib": 0,
            "source": "tmplbuild-hello", "source_version": "1.0", "maintainer": "Test <test@example.invalid>",
            "sha256": hashlib.sha256(deb.read_bytes()).hexdigest(), "uri": f"{url}/pool/{deb.name}",
            "license": "NOASSERTION"} in [{**p, "installed_size_kib": 0} for p in manifest["packages"]]
    tree = unpack(only(out, "*.tar.zst"), tmp_path / "tree")
    assert (tree / "usr/share/tmplbuild-hello/hello").read_text() == "hello from a signed repository\n"
    sources = (tree / "etc/apt/sources.list.d/local.sources").read_text()
    assert "Signed-By: /etc/apt/keyrings/tmplbuild-local.asc" in sources
    assert (tree / "etc/apt/keyrings/tmplbuild-local.asc").read_bytes() == key.read_bytes()
    assert not list((tree / "etc/apt/trusted.gpg.d").glob("*local*"))  # never trusted globally


def test_extra_repository_with_the_wrong_key_fails_with_exit_3(cache, tmp_path, served_repo):
    url, key = served_repo
    other = tmp_path / "other"
    other.mkdir(mode=0o700)
    gpg(other, "--quick-gen-key", "other <o@example.invalid>", "ed25519", "sign", "1d")
    key.write_bytes(gpg(other, "--armor", "--export").stdout)
    subprocess.run(["gpgconf", "--homedir", str(other), "--kill", "all"], capture_output=True)
    out = tmp_path / "out"
    proc = build(repo_recipe(tmp_path, url, key), out, cache)
    assert proc.returncode == 3, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("tmplbuild: repository signature: ")
    assert_nothing_left(out, cache)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_build_leaves_no_file_mount_or_process(cache, tmp_path, sig):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "tmplbuild", "build", "debian-12-minimal", "--out", str(out),
                             "--cache-dir", str(cache)], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    seen = []
    for line in proc.stderr:  # wait until debootstrap is well into installing
        seen.append(line)
        if line.startswith("==> bootstrap"):
            time.sleep(4)
            break
    proc.send_signal(sig)
    proc.stderr.read()
    assert proc.wait(timeout=60) == 130, seen
    assert_nothing_left(out, cache)
    leftover = subprocess.run(["pgrep", "-f", f"{cache}/build"], capture_output=True, text=True).stdout
    assert leftover == ""  # debootstrap and its dpkg children went with it
