"""SBOMs and provenance: what independent implementations make of them (spdx-tools, cyclonedx-python-lib), and how
they travel: published and listed in the signed index, served, and fetched with `tmplbuild sbom` / `show` only
after their hashes checked. The real template's documents are checked in tests/test_build.py."""
from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from tests.conftest import ROOT, previous_tmplbuild
from tests.test_client import client_env
from tests.test_repo import make_artifact
from tests.test_server import Server, init_repo, kill_agents, make_key
from tests.test_repo import publish
from tmplbuild.manifest import Manifest, ManifestArtifact, Package
from tmplbuild.repo import index as idx
from tmplbuild.sbom import documents

SSL = Package("libssl3", "3.0.15-1~deb12u1", "amd64", 6000, "openssl", "3.0.15-1~deb12u1",
              "Debian OpenSSL Team <pkg-openssl-devel@lists.alioth.debian.org>", "c" * 64,
              "http://mirror.invalid/debian/pool/main/o/openssl/libssl3_3.0.15-1~deb12u1_amd64.deb", "Apache-2.0")
PACKAGES = (
    Package("base-files", "12.4+deb12u8", "amd64", 400, "base-files", "12.4+deb12u8", "Santiago Vila <sanvila@debian.org>",
            "d" * 64, "", "LicenseRef-public-domain AND (GPL-2.0-or-later OR MIT)"),
    Package("libfoo1", "1:2.0-1+b1", "amd64", 3, "foo", "1:2.0-1", "Foo Maintainer", "", "", "NOASSERTION"),
    SSL,
    Package("openssl", "3.0.15-1~deb12u1", "amd64", 2000, "openssl", "3.0.15-1~deb12u1", SSL.maintainer, "e" * 64, "",
            "Apache-2.0"),
)


def manifest(packages=PACKAGES, sha="a" * 64) -> Manifest:
    return Manifest(name="debian-12-minimal", version="12-20261205", arch="amd64", distribution="debian", release="12",
                    suite="bookworm", description="Debian 12", created="2026-12-05T00:00:00Z",
                    source_date_epoch=1_764_892_800,
                    build={"input_hash": "sha256:" + "0" * 64, "recipe_sha256": "b" * 64,
                           "extends": ["debian-12-base"], "tmplbuild": "0.1.0", "zstd_level": 19, "xz_level": 6},
                    apt_sources=("deb http://mirror.invalid/debian bookworm main",), packages=packages,
                    artifacts=(ManifestArtifact("debian-12-minimal_12-20261205_amd64.tar.zst", "tar.zst", 10, sha,
                                                "f" * 128),))


def spdx_messages(path: Path) -> list[str]:
    from spdx_tools.spdx.parser.parse_anything import parse_file
    from spdx_tools.spdx.validation.document_validator import validate_full_spdx_document

    return [m.validation_message for m in validate_full_spdx_document(parse_file(str(path)))]


def cyclonedx_error(data: bytes):
    from cyclonedx.schema import SchemaVersion
    from cyclonedx.validation.json import JsonStrictValidator

    return JsonStrictValidator(SchemaVersion.V1_5).validate_str(data.decode())


def check_documents(spdx_path: Path, cdx_data: bytes, packages) -> None:
    """What the issue asks of every pair of SBOMs: spdx-tools validates the SPDX one with no message,
    cyclonedx-python-lib validates the CycloneDX one against its spec version's schema, and every package of the
    manifest is in both with the same version, purl and hash."""
    assert spdx_messages(spdx_path) == []
    assert cyclonedx_error(cdx_data) is None
    spdx = json.loads(spdx_path.read_bytes())
    cdx = json.loads(cdx_data)
    by_name = {}
    for p in spdx["packages"]:
        purls = [r["referenceLocator"] for r in p.get("externalRefs", []) if r["referenceType"] == "purl"]
        if purls and "arch=source" not in purls[0]:
            by_name[p["name"]] = (p["versionInfo"], purls[0], [c["checksumValue"] for c in p.get("checksums", [])])
    comps = {c["name"]: (c["version"], c["purl"], [h["content"] for h in c.get("hashes", [])])
             for c in cdx["components"]}
    expected = {p.name: (p.version, documents.purl(p.name, p.version, p.arch, "debian-12"),
                         [p.sha256] if p.sha256 else []) for p in packages}
    assert by_name == expected
    assert comps == expected


def test_both_sboms_validate_with_independent_implementations_and_list_every_package(tmp_path):
    m = manifest()
    (tmp_path / "t.spdx.json").write_bytes(documents.spdx(m))
    check_documents(tmp_path / "t.spdx.json", documents.cyclonedx(m), PACKAGES)
    # cyclonedx-python-lib also reads it back into its model.
    from cyclonedx.model.bom import Bom

    bom = Bom.from_json(json.loads(documents.cyclonedx(m)))
    assert {c.name for c in bom.components} == {p.name for p in PACKAGES}


def test_purls_relationships_supplier_and_licences(tmp_path):
    m = manifest()
    spdx = json.loads(documents.spdx(m))
    ids = {p["SPDXID"]: p for p in spdx["packages"]}
    rel = {(r["spdxElementId"], r["relationshipType"], r["relatedSpdxElement"]) for r in spdx["relationships"]}
    assert ("SPDXRef-DOCUMENT", "DESCRIBES", "SPDXRef-Template") in rel
    contained = {ids[b]["name"] for a, t, b in rel if (a, t) == ("SPDXRef-Template", "CONTAINS")}
    assert contained == {p.name for p in PACKAGES}
    generated = {(ids[a]["name"], ids[b]["name"], ids[b]["versionInfo"]) for a, t, b in rel if t == "GENERATED_FROM"}
    # libssl3 and openssl come from one source package, listed once; a binNMU's source keeps its own version
    assert generated == {("base-files", "base-files", "12.4+deb12u8"), ("libfoo1", "foo", "1:2.0-1"),
                         ("libssl3", "openssl", "3.0.15-1~deb12u1"), ("openssl", "openssl", "3.0.15-1~deb12u1")}
    assert sum(1 for p in spdx["packages"] if p.get("primaryPackagePurpose") == "SOURCE") == 3
    ssl = next(p for p in spdx["packages"] if p["name"] == "libssl3")
    assert ssl["supplier"] == "Person: Debian OpenSSL Team (pkg-openssl-devel@lists.alioth.debian.org)"
    assert ssl["licenseDeclared"] == "Apache-2.0" and ssl["checksums"] == [{"algorithm": "SHA256",
                                                                           "checksumValue": "c" * 64}]
    foo = next(p for p in spdx["packages"] if p["name"] == "libfoo1")
    assert foo["licenseDeclared"] == "NOASSERTION" and "checksums" not in foo
    # The epoch's colon and the binNMU's + are percent-encoded (purl spec); the distro follows the release.
    assert documents.purl("libfoo1", "1:2.0-1+b1", "amd64", "debian-12") == \
        "pkg:deb/debian/libfoo1@1%3A2.0-1%2Bb1?arch=amd64&distro=debian-12"
    extracted = {e["licenseId"] for e in spdx["hasExtractedLicensingInfos"]}
    assert extracted == {"LicenseRef-public-domain"}
    cdx = json.loads(documents.cyclonedx(m))
    comps = {c["name"]: c for c in cdx["components"]}
    assert "licenses" not in comps["libfoo1"]  # NOASSERTION: no licence claimed at all
    assert comps["base-files"]["licenses"] == [{"expression": "LicenseRef-public-domain AND (GPL-2.0-or-later OR MIT)"}]
    assert comps["libssl3"]["pedigree"]["ancestors"][0]["purl"] == \
        "pkg:deb/debian/openssl@3.0.15-1~deb12u1?arch=source&distro=debian-12"
    assert comps["libssl3"]["supplier"]["contact"] == [{"email": "pkg-openssl-devel@lists.alioth.debian.org"}]
    assert cdx["dependencies"][0]["dependsOn"] == [c["bom-ref"] for c in cdx["components"]]


def test_documents_are_deterministic_and_named_by_the_templates_identity():
    assert documents.spdx(manifest()) == documents.spdx(manifest())
    assert documents.cyclonedx(manifest()) == documents.cyclonedx(manifest())
    one, other = json.loads(documents.cyclonedx(manifest())), json.loads(documents.cyclonedx(manifest(sha="9" * 64)))
    assert re.fullmatch(r"urn:uuid:[0-9a-f-]{36}", one["serialNumber"])
    assert one["serialNumber"] != other["serialNumber"]  # another template content, another serial number
    assert json.loads(documents.spdx(manifest()))["documentNamespace"] != \
        json.loads(documents.spdx(manifest(sha="9" * 64)))["documentNamespace"]
    assert one["metadata"]["timestamp"] == "2025-12-05T00:00:00Z"  # SOURCE_DATE_EPOCH, not the clock


def test_provenance_is_an_in_toto_statement_with_a_slsa_v1_predicate():
    m = manifest()
    data = documents.provenance(m, [("b.spdx.json", "2" * 64), ("a.tar.zst", "a" * 64)],
                                [documents.Release("http://mirror.invalid/debian/dists/bookworm/InRelease", "1" * 64)],
                                ["tar.zst", "oci.tar"])
    st = json.loads(data)
    assert st["_type"] == "https://in-toto.io/Statement/v1"
    assert st["predicateType"] == "https://slsa.dev/provenance/v1"
    assert st["subject"] == [{"name": "a.tar.zst", "digest": {"sha256": "a" * 64}},
                             {"name": "b.spdx.json", "digest": {"sha256": "2" * 64}}]
    bd = st["predicate"]["buildDefinition"]
    assert bd["buildType"] == documents.BUILD_TYPE
    assert bd["externalParameters"]["recipe"] == {"name": "debian-12-minimal", "sha256": "b" * 64,
                                                  "extends": ["debian-12-base"]}
    assert bd["internalParameters"]["zstd_level"] == 19 and bd["internalParameters"]["xz_level"] == 6
    deps = bd["resolvedDependencies"]
    assert deps[0] == {"uri": "http://mirror.invalid/debian/dists/bookworm/InRelease", "digest": {"sha256": "1" * 64}}
    assert {"name": "libssl3_3.0.15-1~deb12u1_amd64.deb", "uri": SSL.uri, "digest": {"sha256": "c" * 64}} in deps
    assert not any(d.get("name", "").startswith("libfoo1") for d in deps)  # no verified hash: not claimed
    rd = st["predicate"]["runDetails"]
    assert rd["builder"]["version"] == {"tmplbuild": "0.1.0"}
    assert rd["metadata"]["startedOn"] == rd["metadata"]["finishedOn"] == "2025-12-05T00:00:00Z"


# -- published, served, fetched ------------------------------------------------------------------------------------

def run(env, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "tmplbuild", *args], cwd=ROOT, capture_output=True, env=env,
                          timeout=120)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    base = tmp_path_factory.mktemp("sbom-served")
    key = make_key(base)
    repo = init_repo(base / "repo", key)
    art = make_artifact(base / "out", packages=PACKAGES)
    assert publish(repo, key, art).returncode == 0
    server = Server(repo, base / "logs", workers=1)
    pub = base / "pub.asc"
    subprocess.run(["gpg", "--homedir", str(key[0]), "--armor", "--export", key[1]], stdout=open(pub, "wb"), check=True)
    yield base, repo, server, key, pub, art
    server.stop()
    kill_agents(key[0])


def test_documents_are_in_the_signed_index_served_linked_and_listed(served):
    base, repo, server, key, pub, art = served
    entry = json.loads((repo / "index.json").read_bytes())["templates"][0]
    formats = [f["format"] for f in entry["files"]]
    assert formats[0] == "tar.zst" and formats[-3:] == list(idx.DOCUMENT_FORMATS)  # tar.zst stays the primary
    sums = (repo / entry["files"][1]["path"]).parent.joinpath("SHA256SUMS").read_text()
    for f in entry["files"][1:]:
        got = requests.get(server.url("/" + f["path"]), timeout=30)
        assert got.status_code == 200 and hashlib.sha256(got.content).hexdigest() == f["sha256"]
        assert f["sha256"] in sums
    page = requests.get(server.url("/"), timeout=30).text
    for f in entry["files"][1:]:
        assert f'href="{server.url("/" + f["path"])}"' in page
    for label, f in zip(("SBOM (SPDX 2.3)", "SBOM (CycloneDX 1.5)", "SLSA provenance"), entry["files"][-3:]):
        assert f'{label}: <a href="{server.url("/" + f["path"])}"' in page
    api = requests.get(server.url("/api/v1/templates"), timeout=30).json()
    docs = api["templates"][0]["documents"]
    assert docs == {"spdx": entry["files"][-3]["path"], "cyclonedx": entry["files"][-2]["path"],
                    "provenance": entry["files"][-1]["path"]}


def test_sbom_and_show_fetch_verified_documents(served, tmp_path):
    base, repo, server, key, pub, art = served
    env = client_env(tmp_path, tmp_path / "config", tmp_path / "state")
    src = ["--url", server.url(""), "--key", str(pub), "--fingerprint", key[1], "--arch", "amd64"]
    got = run(env, "sbom", "demo", "--format", "cyclonedx", *src)
    assert got.returncode == 0, got.stderr
    assert got.stdout == (art.parent / "demo_12-20261120_amd64.cdx.json").read_bytes()
    out = tmp_path / "demo.spdx.json"
    got = run(env, "sbom", "demo", "-o", str(out), *src)
    assert got.returncode == 0, got.stderr
    assert spdx_messages(out) == []
    got = run(env, "sbom", "demo", "--format", "provenance", *src)
    assert json.loads(got.stdout)["predicateType"] == "https://slsa.dev/provenance/v1"
    shown = run(env, "show", "demo", "--json", *src)
    assert shown.returncode == 0, shown.stderr
    rows = json.loads(shown.stdout)["packages"]
    assert [(r["name"], r["version"], r["source"], r["license"]) for r in rows] == \
        [(p.name, p.version, p.source_name, p.license) for p in PACKAGES]
    text = run(env, "show", "demo", *src).stdout.decode()
    assert "libssl3" in text and "openssl" in text and "Apache-2.0" in text


def test_a_tampered_sbom_is_refused_with_exit_3_and_nothing_written(served, tmp_path):
    base, repo, server, key, pub, art = served
    env = client_env(tmp_path, tmp_path / "config", tmp_path / "state")
    src = ["--url", server.url(""), "--key", str(pub), "--fingerprint", key[1], "--arch", "amd64"]
    path = next((repo / "templates/demo").rglob("*.spdx.json"))
    good = path.read_bytes()
    try:
        path.write_bytes(good.replace(b"NOASSERTION", b"MIT        ", 1))  # same size, other bytes
        out = tmp_path / "x.spdx.json"
        got = run(env, "sbom", "demo", "-o", str(out), *src)
        assert got.returncode == 3, got.stderr
        assert b"sha256" in got.stderr and len(got.stderr.decode().strip().splitlines()) == 1
        assert not out.exists() and not list(tmp_path.glob(".x.spdx.json*"))
        got = run(env, "sbom", "demo", *src)
        assert got.returncode == 3 and got.stdout == b""
    finally:
        path.write_bytes(good)


# -- the previous tmplbuild reads a repository with documents -------------------------------------------------------

PREVIOUS = "bb8622b"  # main before the SBOMs (issue 19's last commit)


@pytest.fixture(scope="module")
def previous(tmp_path_factory):
    return previous_tmplbuild(tmp_path_factory, PREVIOUS)


def test_the_previous_tmplbuild_lists_fetches_and_audits_a_repository_with_documents(served, previous, tmp_path):
    base, repo, server, key, pub, art = served
    env = {**client_env(tmp_path, tmp_path / "config", tmp_path / "state"), "PYTHONPATH": str(previous)}
    src = ["--url", server.url(""), "--key", str(pub), "--fingerprint", key[1]]

    def old(*args: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([sys.executable, "-m", "tmplbuild", *args], cwd=previous, capture_output=True, env=env,
                              timeout=120)

    assert b"sbom" not in old("--help").stdout  # it is the previous one
    listed = old("list", "--json", *src)
    assert listed.returncode == 0, listed.stderr
    entry = json.loads(listed.stdout)["templates"][0]
    assert [f["format"] for f in entry["files"]][-3:] == list(idx.DOCUMENT_FORMATS)
    got = old("fetch", "demo", "--arch", "amd64", "--dest", str(tmp_path / "cache"), *src)
    assert got.returncode == 0, got.stderr
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["demo_12-20261120_amd64.tar.zst"]
    audit = old("repo", "verify", str(repo))
    assert audit.returncode == 0, audit.stderr + audit.stdout
