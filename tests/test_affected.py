"""`tmplbuild affected` and /api/v1/affected: which template versions carry a package (below a fixed version).

The logic (tmplbuild.sbom.affected) on hand-made manifests; then end to end against a real signed repository
(`tmplbuild repo init` + `publish`) served by `tmplbuild serve` on 127.0.0.1, the CLI as a node admin runs it,
with its own state and config directories."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from tests.test_client import Server as RecordingServer
from tests.test_client import client_env, run_client
from tests.test_repo import make_artifact, publish, tmplbuild
from tests.test_server import Server
from tmplbuild.errors import AuthenticityError, UsageError
from tmplbuild.manifest import Manifest, Package
from tmplbuild.repo import index as idx
from tmplbuild.sbom import affected

FIXED = "3.0.15-1~deb12u1"
OLD, NEW = "12-20261120", "12-20261130"


# -- the logic ------------------------------------------------------------------------------------------------------

def pkg(name: str, version: str, source: str = "", source_version: str = "", arch: str = "amd64") -> Package:
    return Package(name=name, version=version, arch=arch, source=source, source_version=source_version)


def pair(name: str, version: str, packages: tuple[Package, ...], arch: str = "amd64",
         created: str = "2026-11-20T00:00:00Z") -> tuple[idx.Entry, Manifest]:
    manifest = Manifest(name=name, version=version, arch=arch, created=created, packages=packages)
    data = manifest.to_bytes()
    directory = f"templates/{name}/{version}"
    entry = idx.Entry(name=name, version=version, arch=arch, distribution="debian", release="12", variant="demo",
                      description="", created=created, input_hash="",
                      files=(idx.FileRef(f"{directory}/{name}_{version}_{arch}.tar.zst", 1, "0" * 64, "0" * 128,
                                         "tar.zst"),),
                      manifest=idx.FileRef(f"{directory}/{name}_{version}_{arch}.manifest.json", len(data),
                                           hashlib.sha256(data).hexdigest()))
    return entry, manifest


def hits(pairs, package: str, fixed: str | None) -> list[tuple[str, str, str, bool, list[str]]]:
    return [(a.name, a.version, a.arch, a.newest, [p.name for p in a.packages])
            for a in affected.find(pairs, package, fixed)]


LIBSSL_BINNMU = pkg("libssl3", "3.0.11-1~deb12u2+b1", "openssl", "3.0.11-1~deb12u2")


def test_a_query_matches_binary_names_and_source_names():
    pairs = [pair("demo", OLD, (pkg("openssl", "3.0.11-1~deb12u2"), LIBSSL_BINNMU, pkg("zlib1g", "1:1.2.13-1")))]
    assert hits(pairs, "openssl", None) == [("demo", OLD, "amd64", True, ["libssl3", "openssl"])]
    assert hits(pairs, "libssl3", None) == [("demo", OLD, "amd64", True, ["libssl3"])]
    assert hits(pairs, "curl", None) == []


def test_a_source_match_compares_the_source_version_a_binary_match_the_binary_version():
    pairs = [pair("demo", OLD, (LIBSSL_BINNMU,))]
    # The binNMU is built from source 3.0.11-1~deb12u2: the advisory's fixed source version covers it.
    assert hits(pairs, "openssl", "3.0.11-1~deb12u2") == []
    assert hits(pairs, "openssl", "3.0.11-1~deb12u3") == [("demo", OLD, "amd64", True, ["libssl3"])]
    # By its binary name the binary's own version counts: +b1 sorts above the source version, below +b2.
    assert hits(pairs, "libssl3", "3.0.11-1~deb12u2") == []
    assert hits(pairs, "libssl3", "3.0.11-1~deb12u2+b2") == [("demo", OLD, "amd64", True, ["libssl3"])]


@pytest.mark.parametrize(("installed", "fixed", "is_affected"), [
    ("3.0.15-1~deb12u1", "3.0.15-1", True),  # ~ sorts before the end: a backport is older than the release
    ("3.0.15-1", "3.0.15-1", False),
    ("3.0.15-1~deb12u1", FIXED, False),
    ("3.0.9-1", "3.0.11-1", True),  # numerically, not as text
    ("1:2.0-1", "2.5-1", False),  # an epoch outranks every upstream version
    ("1:2.0-1", "1:2.1", True),
    ("2.0-1", "1:0.1-1", True),
])
def test_dpkg_ordering_decides_below(installed, fixed, is_affected):
    assert bool(hits([pair("demo", OLD, (pkg("openssl", installed),))], "openssl", fixed)) is is_affected


def test_an_old_manifest_without_source_fields_falls_back_as_dpkg_does():
    pairs = [pair("demo", OLD, (pkg("libssl3", "3.0.11-1~deb12u2"),))]
    assert hits(pairs, "openssl", None) == []  # no Source field: its own source
    assert hits(pairs, "libssl3", FIXED) == [("demo", OLD, "amd64", True, ["libssl3"])]


def test_newest_is_per_name_and_arch_by_created_then_version_and_results_sort_in_dpkg_order():
    ssl = (pkg("openssl", "3.0.11-1~deb12u2"),)
    pairs = [pair("demo", "12-10", ssl, created="2026-11-20T00:00:00Z"),
             pair("demo", "12-9", ssl, created="2026-11-10T00:00:00Z"),
             pair("demo", "12-8", ssl, arch="arm64", created="2026-11-01T00:00:00Z"),
             pair("base", "1", ssl, created="2026-11-01T00:00:00Z"),
             pair("base", "2", ssl, created="2026-11-01T00:00:00Z")]  # same created: the version decides
    assert [(n, v, a, newest) for n, v, a, newest, _ in hits(pairs, "openssl", None)] == [
        ("base", "1", "amd64", False), ("base", "2", "amd64", True),
        ("demo", "12-9", "amd64", False), ("demo", "12-10", "amd64", True), ("demo", "12-8", "arm64", True)]


def test_the_report_shape():
    index = idx.Index(repo_id="r", version=7, generated="2026-11-20T00:00:00Z", expires="2026-12-20T00:00:00Z")
    pairs = [pair("demo", OLD, (LIBSSL_BINNMU,)), pair("demo", NEW, (), created="2026-11-30T00:00:00Z")]
    doc = affected.report(index, affected.query("openssl", FIXED), pairs)
    assert doc == {"package": "openssl", "fixed": FIXED, "arch": None, "repo_id": "r", "index_version": 7,
                   "checked": 2, "affected": [{"name": "demo", "version": OLD, "arch": "amd64", "newest": False,
                                               "packages": [{"name": "libssl3", "version": "3.0.11-1~deb12u2+b1",
                                                             "arch": "amd64", "source": "openssl",
                                                             "source_version": "3.0.11-1~deb12u2"}]}]}


@pytest.mark.parametrize("name", ["openssl", "libssl3", "g++-12", "libstdc++6", "python3.11"])
def test_package_names_accepted(name):
    assert affected.query(name).package == name


@pytest.mark.parametrize("name", ["OpenSSL", "a", "-x", "lib_ssl", "openssl ", "openssl;rm", ""])
def test_malformed_package_names_refused(name):
    with pytest.raises(UsageError) as err:
        affected.query(name)
    assert err.value.check == "package name"


@pytest.mark.parametrize("version", ["3.0.15-1~deb12u1", "1:2.0-1", "3.0.11-1~deb12u2+b1", "2.36.1-8+deb12u1",
                                     "12", "0:1.0", "1.0+dfsg-1-2"])
def test_versions_accepted(version):
    assert affected.query("openssl", version).fixed == version


@pytest.mark.parametrize("version", ["", "v1.0", "1.0-", "a:1.0", ":1.0", "1:", "1.0_1", "1.0 ", "~1", "1:1:1"])
def test_malformed_versions_refused(version):
    with pytest.raises(UsageError) as err:
        affected.query("openssl", version)
    assert err.value.check == "fixed version"


def test_manifest_bytes_must_be_the_signed_ones():
    entry, manifest = pair("demo", OLD, (LIBSSL_BINNMU,))
    data = manifest.to_bytes()
    assert affected.parsed(entry, data) == manifest
    for bad in (data + b" ", data.replace(b"3.0.11", b"3.0.99")):
        with pytest.raises(AuthenticityError) as err:
            affected.parsed(entry, bad)
        assert err.value.check == "manifest"
    other, _ = pair("demo", NEW, ())
    with pytest.raises(AuthenticityError, match=f"demo {OLD} amd64"):  # signed, but another template's manifest
        affected.parsed(dataclasses.replace(other, manifest=entry.manifest), data)


def test_the_server_cache_reads_each_manifest_once_and_keeps_only_what_the_index_lists():
    pairs = [pair("demo", OLD, (LIBSSL_BINNMU,)), pair("demo", NEW, (), created="2026-11-30T00:00:00Z")]
    blobs = {e.manifest.sha256: m.to_bytes() for e, m in pairs}
    reads: list[str] = []

    def read(entry):
        reads.append(entry.version)
        return blobs[entry.manifest.sha256]

    index = idx.Index("r", 1, "2026-11-20T00:00:00Z", "2026-12-20T00:00:00Z", tuple(e for e, _ in pairs))
    cache = affected.ManifestCache()
    assert cache.manifests(index, index.templates, read) == pairs
    assert cache.manifests(index, index.templates, read) == pairs
    assert reads == [OLD, NEW]
    later = idx.Index("r", 2, "2026-11-20T00:00:00Z", "2026-12-20T00:00:00Z", (pairs[1][0],))
    cache.manifests(later, later.templates, read)
    cache.manifests(index, index.templates, read)
    assert reads == [OLD, NEW, OLD]  # dropped when an index no longer listed it
    blobs[pairs[0][0].manifest.sha256] = b"{}"
    fresh = affected.ManifestCache()
    with pytest.raises(AuthenticityError):
        fresh.manifests(index, index.templates, read)
    with pytest.raises(AuthenticityError):  # nothing was kept from the failed query
        fresh.manifests(index, index.templates, read)


# -- end to end ----------------------------------------------------------------------------------------------------

def artifact(out: Path, name: str, version: str, arch: str, created: str, packages: list[dict]) -> Path:
    """A fake built template (tests/test_repo.make_artifact) whose manifest lists `packages`."""
    path = make_artifact(out / f"{name}-{version}-{arch}", name=name, version=version, arch=arch)
    doc = json.loads(path.read_text())
    doc.update(created=created, packages=packages)
    path.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    return path


def deb(name: str, version: str, source: str = "", source_version: str = "", arch: str = "amd64") -> dict:
    doc = {"name": name, "version": version, "arch": arch, "installed_size_kib": 100}
    if source:
        doc.update(source=source, source_version=source_version or version)
    return doc


@dataclass
class Repo:
    root: Path
    pub: Path
    fpr: str
    home: Path

    def manifest(self, name: str, version: str, arch: str = "amd64") -> Path:
        return self.root / f"templates/{name}/{version}/{name}_{version}_{arch}.manifest.json"


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """demo OLD (openssl and a binNMU'd libssl3 below FIXED), demo NEW (fixed), other NEW arm64 (only libssl3, from
    source openssl, below FIXED): three template versions, two of them affected."""
    tmp = tmp_path_factory.mktemp("affected")
    home, pub = tmp / "gnupg", tmp / "pub.asc"
    proc = tmplbuild("key", "generate", "--name", "Affected Test <a@example.invalid>", "--gnupghome", str(home),
                     "--out", str(pub))
    assert proc.returncode == 0, proc.stderr
    fpr = proc.stdout.strip()
    root = tmp / "repo"
    proc = tmplbuild("repo", "init", str(root), "--key", fpr, "--gnupghome", str(home), "--id", "affected-repo")
    assert proc.returncode == 0, proc.stderr
    out = tmp / "out"
    built = [
        artifact(out, "demo", OLD, "amd64", "2026-11-20T00:00:00Z",
                 [deb("openssl", "3.0.11-1~deb12u2"), deb("libssl3", "3.0.11-1~deb12u2+b1", "openssl", "3.0.11-1~deb12u2"),
                  deb("zlib1g", "1:1.2.13.dfsg-1")]),
        artifact(out, "demo", NEW, "amd64", "2026-11-30T00:00:00Z",
                 [deb("openssl", FIXED), deb("libssl3", FIXED, "openssl"), deb("zlib1g", "1:1.2.13.dfsg-1")]),
        artifact(out, "other", NEW, "arm64", "2026-11-30T00:00:00Z",
                 [deb("libssl3", "3.0.13-1~deb12u1", "openssl", arch="arm64")]),
    ]
    proc = publish(root, (home, fpr), *built)
    assert proc.returncode == 0, proc.stderr
    yield Repo(root, pub, fpr, home)
    subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "all"], capture_output=True)


@pytest.fixture(scope="module")
def server(repo, tmp_path_factory):
    srv = Server(repo.root, tmp_path_factory.mktemp("affected-logs"))
    yield srv
    srv.stop()


@dataclass
class Node:
    """A node admin's machine: its own config and state directories."""

    tmp: Path
    repo: Repo

    @property
    def state(self) -> Path:
        return self.tmp / "state"

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return run_client(client_env(self.tmp, self.tmp / "config", self.state), "affected", *args)

    def remote(self, url: str, *args: str) -> subprocess.CompletedProcess[str]:
        return self.run(*args, "--url", url, "--key", str(self.repo.pub), "--fingerprint", self.repo.fpr)

    def cached(self) -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in sorted((self.state / "manifests").glob("*"))}


@pytest.fixture
def node(tmp_path, repo):
    return Node(tmp_path, repo)


def rows(proc: subprocess.CompletedProcess[str]) -> list[list[str]]:
    return [line.split() for line in proc.stdout.splitlines()]


HEADER = ["TEMPLATE", "VERSION", "ARCH", "PACKAGE", "INSTALLED", "SOURCE", "NEWEST"]


def test_templates_below_the_fixed_version_exit_1_with_their_rows(node, server):
    proc = node.remote(server.base, "openssl", "--fixed", FIXED)
    assert proc.returncode == 1, proc.stderr
    assert rows(proc) == [
        HEADER,
        ["demo", OLD, "amd64", "libssl3", "3.0.11-1~deb12u2+b1", "openssl=3.0.11-1~deb12u2", "no"],
        ["demo", OLD, "amd64", "openssl", "3.0.11-1~deb12u2", "openssl=3.0.11-1~deb12u2", "no"],
        # found by its source name: the template carries no binary called openssl
        ["other", NEW, "arm64", "libssl3", "3.0.13-1~deb12u1", "openssl=3.0.13-1~deb12u1", "yes"],
    ]
    assert proc.stderr.strip() == (f"affected: 2 of 3 template versions carry openssl below {FIXED} (1 of them "
                                   "the newest of their name and arch)")


def test_nothing_below_the_fixed_version_exits_0(node, server):
    proc = node.remote(server.base, "openssl", "--fixed", "3.0.11-1~deb12u1")
    assert (proc.returncode, proc.stdout) == (0, ""), proc.stderr
    assert proc.stderr.strip() == "nothing affected: 3 template versions checked for openssl below 3.0.11-1~deb12u1"
    assert node.remote(server.base, "curl").returncode == 0


def test_a_binary_name_is_compared_at_its_own_version_and_arch_filters(node, server):
    proc = node.remote(server.base, "libssl3", "--fixed", "3.0.11-1~deb12u2+b2", "--arch", "amd64")
    assert proc.returncode == 1, proc.stderr
    assert [r[:4] for r in rows(proc)[1:]] == [["demo", OLD, "amd64", "libssl3"]]
    assert "of 2 template versions" in proc.stderr  # other (arm64) not looked at


def test_json_the_server_api_and_a_local_repository_give_one_answer(node, server, repo):
    proc = node.remote(server.base, "openssl", "--fixed", FIXED, "--json")
    assert proc.returncode == 1, proc.stderr
    doc = json.loads(proc.stdout)
    assert set(doc) == {"package", "fixed", "arch", "repo_id", "index_version", "checked", "affected"}
    assert (doc["package"], doc["fixed"], doc["arch"], doc["repo_id"], doc["index_version"], doc["checked"]) == \
        ("openssl", FIXED, None, "affected-repo", 2, 3)
    assert [(a["name"], a["version"], a["arch"], a["newest"]) for a in doc["affected"]] == \
        [("demo", OLD, "amd64", False), ("other", NEW, "arm64", True)]
    assert doc["affected"][0]["packages"][0] == {"name": "libssl3", "version": "3.0.11-1~deb12u2+b1", "arch": "amd64",
                                                 "source": "openssl", "source_version": "3.0.11-1~deb12u2"}
    api = requests.get(server.url("/api/v1/affected"), params={"package": "openssl", "fixed": FIXED}, timeout=10)
    assert api.status_code == 200 and api.json() == doc
    local = node.run("openssl", "--fixed", FIXED, "--json", "--repo", str(repo.root))
    assert local.returncode == 1 and json.loads(local.stdout) == doc, local.stderr
    arm = requests.get(server.url("/api/v1/affected?package=openssl&arch=arm64"), timeout=10).json()
    assert json.loads(node.remote(server.base, "openssl", "--arch", "arm64", "--json").stdout) == arm
    assert arm["checked"] == 1 and [a["name"] for a in arm["affected"]] == ["other"]


def test_the_api_refuses_bad_queries_with_400(server):
    for query, check in (("", "package"), ("?package=Bad_Name", "package name"),
                         ("?package=openssl&fixed=v1", "fixed version"), ("?package=openssl&arch=AMD64", "arch")):
        answer = requests.get(server.url("/api/v1/affected" + query), timeout=10)
        assert answer.status_code == 400 and answer.json()["error"].startswith(f"{check}: "), answer.text


def test_the_manifest_cache_is_used_and_a_tampered_cached_copy_is_fetched_again(node, repo):
    srv = RecordingServer(repo.root)
    try:
        path = repo.manifest("demo", OLD).relative_to(repo.root).as_posix()
        first = node.remote(srv.url, "openssl", "--fixed", FIXED, "--json")
        assert first.returncode == 1, first.stderr
        cached = node.cached()
        assert len(cached) == 3 and all(hashlib.sha256(b).hexdigest() == n for n, b in cached.items())
        assert node.remote(srv.url, "openssl", "--fixed", FIXED, "--json").stdout == first.stdout
        assert len(srv.gets(path)) == 1  # the second run read every manifest from the cache
        sha = hashlib.sha256(repo.manifest("demo", OLD).read_bytes()).hexdigest()
        hidden = cached[sha].replace(b"3.0.11-1~deb12u2", b"3.0.99-1~deb12u2")  # same size, hides the hit
        (node.state / "manifests" / sha).write_bytes(hidden)
        again = node.remote(srv.url, "openssl", "--fixed", FIXED, "--json")
        assert again.returncode == 1 and again.stdout == first.stdout, again.stderr
        assert len(srv.gets(path)) == 2 and node.cached() == cached  # fetched again, the cache repaired
    finally:
        srv.stop()


def test_a_manifest_tampered_on_the_mirror_is_refused_and_not_cached(node, repo):
    srv = RecordingServer(repo.root)
    try:
        path = repo.manifest("demo", OLD).relative_to(repo.root).as_posix()
        srv.flip.add(path)
        proc = node.remote(srv.url, "openssl", "--fixed", FIXED)
        assert proc.returncode == 3 and proc.stdout == "", proc.stderr
        line, = proc.stderr.strip().splitlines()
        assert line.startswith(f"tmplbuild: manifest: {path}: ")
        sha = hashlib.sha256(repo.manifest("demo", OLD).read_bytes()).hexdigest()
        assert sha not in node.cached()
        assert all(hashlib.sha256(b).hexdigest() == n for n, b in node.cached().items())
        assert not list(node.state.glob("*.json"))  # the run failed: no index recorded
    finally:
        srv.stop()


def test_a_manifest_tampered_in_the_repository_fails_the_server_the_client_and_repo(node, repo, tmp_path):
    copy = tmp_path / "repo"
    shutil.copytree(repo.root, copy, ignore=shutil.ignore_patterns(".lock"))
    manifest = copy / repo.manifest("demo", OLD).relative_to(repo.root)
    data = manifest.read_bytes()
    manifest.write_bytes(data.replace(b'"3.0.11-1~deb12u2"', b'"3.0.99-1~deb12u2"'))  # same size: only the hash
    assert manifest.stat().st_size == len(data)
    srv = Server(copy, tmp_path / "logs")
    try:
        proc = node.remote(srv.base, "openssl", "--fixed", FIXED)
        assert proc.returncode == 3 and proc.stdout == "", proc.stderr
        assert proc.stderr.startswith(f"tmplbuild: manifest: {manifest.relative_to(copy).as_posix()}: ")
        assert not (node.state / "manifests" / hashlib.sha256(data).hexdigest()).exists()
        api = requests.get(srv.url("/api/v1/affected?package=openssl"), timeout=10)
        assert api.status_code == 503 and manifest.name in api.json()["error"], api.text
    finally:
        srv.stop()
    local = node.run("openssl", "--repo", str(copy))
    assert local.returncode == 3 and "tmplbuild: manifest: " in local.stderr


@pytest.mark.parametrize("args", [["Bad_Name"], ["openssl", "--fixed", "v1.0"], ["openssl", "--arch", "AMD64"],
                                  ["openssl", "--repo", "/nonexistent", "--url", "http://127.0.0.1:9"]])
def test_bad_arguments_exit_2_with_one_line(node, args):
    proc = node.run(*args)
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("tmplbuild: ")


def test_a_signed_manifest_with_a_version_that_is_not_dpkgs_is_refused_not_a_crash():
    """An installed version dpkg would never write is exit 3 (a manifest not to answer from), never the exit 1 of
    an internal error, which a script would read as "affected"."""
    broken = pair("demo", "1", (pkg("libssl3", "abc:1", "openssl", "abc:1"),))
    with pytest.raises(AuthenticityError, match="not a dpkg version"):
        affected.find([broken], "openssl", "3.0.15-1~deb12u1")
    assert affected.find([broken], "openssl", None)[0].packages[0].version == "abc:1"  # no comparison, no refusal
