"""`tmplbuild rebuild`: the weekly job. Pure parts (changelog, version choice, the "unchanged" rule), the runs
that need no build (re-signing, a broken recipe, an architecture this host cannot build, re-signing over
--to), and then one sequence of real rebuilds against the configured mirror: publish both, nothing to do, one
recipe changed, one recipe broken."""
from __future__ import annotations

from dataclasses import replace

import hashlib
import json
import re
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, can_build, recipe_dir
from tests.oci_registry import registry  # noqa: F401 - a fixture
from tests.test_repo import index_of
from tests.test_server import init_repo, kill_agents, make_key
from tmplbuild.manifest import Manifest, Package
from tmplbuild.manifest import parse as parse_manifest
from tmplbuild.rebuild import changelog, changelog_summary, newest, pick_version, same_content
from tmplbuild.repo import index as idx

# The host's architecture only: the rebuild logic is the subject here (tests/test_foreign_boot.py builds arm64).
MINIMAL = re.sub(r"^architectures = .*$", 'architectures = ["amd64"]',
                 (ROOT / "recipes/debian-12-minimal.toml").read_text(), flags=re.M)
build_only = [pytest.mark.build, pytest.mark.skipif(can_build() is not None, reason=str(can_build()))]


def tmplbuild(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tmplbuild", *args], cwd=ROOT, capture_output=True, text=True)


def write_recipes(d: Path, minimal_extra: list[str] = (), extra: list[str] = ("less",), extra_toml: str = "") -> None:
    recipe_dir(d)
    text = MINIMAL.replace('name = "debian-12-minimal"', 'name = "rb-minimal"')
    if minimal_extra:
        text = text.replace('"ca-certificates"]', '"ca-certificates", ' + ", ".join(f'"{p}"' for p in minimal_extra) + "]")
    (d / "rb-minimal.toml").write_text(text)
    (d / "rb-extra.toml").write_text(
        'extends = "rb-minimal"\n\n[template]\nname = "rb-extra"\nvariant = "extra"\n'
        'description = "rb-minimal and a little more"\n\n[packages]\n'
        f'include = [{", ".join(f"{chr(34)}{p}{chr(34)}" for p in extra)}]\n' + extra_toml)


def rebuild(recipes: Path, repo: Path, key, cache: Path | None = None, *extra: str):
    home, fpr = key
    args = ["rebuild", "--recipes", str(recipes), "--repo", str(repo), "--key", fpr, "--gnupghome", str(home),
            *extra]
    if cache is not None:
        args += ["--cache-dir", str(cache)]
    return tmplbuild(*args)


def rows(proc) -> dict[str, list[str]]:
    """The Markdown summary: template -> [arch, result, version, details]."""
    out = {}
    for line in proc.stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 5 and cells[0] not in ("template", "---"):
            out[cells[0]] = cells[1:]
    return out


# ---------------------------------------------------------------------------------------------- pure


def test_changelog_added_removed_upgraded_downgraded():
    old = (Package("a", "1.0-1"), Package("b", "2.0"), Package("c", "1:1.0"), Package("d", "1.0~rc1"),
           Package("gone", "3"))
    new = (Package("a", "1.0-1"), Package("b", "2.0+deb12u1"), Package("c", "9.9"), Package("d", "1.0"),
           Package("new", "0.1-2"))
    log = changelog(old, new, "12-20261101")
    assert log == {
        "previous_version": "12-20261101",
        "added": [{"name": "new", "version": "0.1-2"}],
        "removed": [{"name": "gone", "version": "3"}],
        "upgraded": [{"name": "b", "from": "2.0", "to": "2.0+deb12u1"}, {"name": "d", "from": "1.0~rc1", "to": "1.0"}],
        "downgraded": [{"name": "c", "from": "1:1.0", "to": "9.9"}],  # the epoch wins
        # Packages without a Source field are their own source (dpkg's rule): a manifest from before SBOMs
        "sources": [{"name": "b", "from": "2.0", "to": "2.0+deb12u1"}, {"name": "c", "from": "1:1.0", "to": "9.9"},
                    {"name": "d", "from": "1.0~rc1", "to": "1.0"}, {"name": "gone", "from": "3", "to": None},
                    {"name": "new", "from": None, "to": "0.1-2"}],
    }
    assert changelog_summary(log) == "+1 -1 ↑2 ↓1 since 12-20261101"
    first = changelog(None, new, None)
    assert first["previous_version"] is None and len(first["added"]) == 5
    assert changelog_summary(first) == "+5 -0 ↑0 ↓0 (first version)"
    # Two binaries of one source (libssl3 and openssl from openssl): one source line, by source version.
    old = (Package("libssl3", "3.0.15-1~deb12u1", source="openssl"), Package("openssl", "3.0.15-1~deb12u1"))
    new = (Package("libssl3", "3.0.16-1~deb12u1", source="openssl"), Package("openssl", "3.0.16-1~deb12u1"))
    assert changelog(old, new, "v1")["sources"] == [{"name": "openssl", "from": "3.0.15-1~deb12u1",
                                                     "to": "3.0.16-1~deb12u1"}]


def test_pick_version_and_newest():
    assert pick_version("12-20261122", set()) == "12-20261122"
    assert pick_version("12-20261122", {"12-20261122"}) == "12-20261122.2"
    assert pick_version("12-20261122", {"12-20261122", "12-20261122.2", "12-20261122.3"}) == "12-20261122.4"
    ref = idx.FileRef("templates/x/1/x_1_amd64.manifest.json", 1, "0" * 64)

    def entry(version, created):
        return idx.Entry("x", version, "amd64", "debian", "12", "", "", created, "", (), ref)

    es = [entry("12-20261122", "2026-11-22T00:00:00Z"), entry("12-20261122.10", "2026-11-22T00:00:00Z"),
          entry("12-20261122.9", "2026-11-22T00:00:00Z"), entry("12-20261101", "2026-11-01T00:00:00Z")]
    assert newest(es).version == "12-20261122.10"
    assert newest([]) is None


def test_unchanged_rule_ignores_the_archive_bytes_but_not_packages_or_recipe():
    base = Manifest("x", "1", "amd64", build={"recipe_sha256": "r", "tmplbuild": "0.1",
                                              "archive": [{"inrelease_sha256": "a"}]},
                    packages=(Package("a", "1", "amd64"),), apt_sources=("deb http://m/debian bookworm main",))
    resigned = replace(base, build={**base.build, "archive": [{"inrelease_sha256": "b"}]})
    assert same_content(resigned, base)
    assert not same_content(replace(base, packages=(Package("a", "2", "amd64"),)), base)
    assert not same_content(replace(base, build={**base.build, "recipe_sha256": "s"}), base)
    assert not same_content(replace(base, apt_sources=("deb http://other/debian bookworm main",)), base)
    # What the builder writes reads back as the same value.
    assert parse_manifest(resigned.to_bytes()) == resigned


# ---------------------------------------------------------------------------------------------- no build


def test_nothing_to_build_resigns_and_reports_failures_and_foreign_arches(tmp_path, monkeypatch):
    key = make_key(tmp_path)
    try:
        repo = init_repo(tmp_path / "repo", key)
        recipes = tmp_path / "recipes"
        write_recipes(recipes, extra=["Bad_Name"])
        # rb-minimal for an architecture this host does not build: no network, no build.
        text = (recipes / "rb-minimal.toml").read_text().replace('["amd64"]', '["s390x"]')
        (recipes / "rb-minimal.toml").write_text(text)
        before = index_of(repo)
        # A host without qemu-user's entry for it (binfmt_misc mounted, no qemu-s390x registered).
        binfmt = tmp_path / "binfmt"
        binfmt.mkdir()
        (binfmt / "status").write_text("enabled\n")
        monkeypatch.setenv("TMPLBUILD_BINFMT_DIR", str(binfmt))
        proc = rebuild(recipes, repo, key, tmp_path / "cache")
        assert proc.returncode == 2, proc.stderr
        table = rows(proc)
        assert table["rb-minimal"][:2] == ["s390x", "skipped"]
        assert "cannot build s390x here" in table["rb-minimal"][3]
        assert "no binfmt_misc entry qemu-s390x" in table["rb-minimal"][3] and "qemu-user-static" in table["rb-minimal"][3]
        assert table["rb-extra"][1] == "failed" and "Bad_Name" in table["rb-extra"][3]
        assert "tmplbuild: rebuild rb-extra" in proc.stderr
        after = index_of(repo)
        assert after["version"] == before["version"] + 1 and after["expires"] >= before["expires"]
        assert after["templates"] == []
        assert tmplbuild("repo", "verify", str(repo)).returncode == 0
        js = rebuild(recipes, repo, key, tmp_path / "cache", "--json")
        data = json.loads(js.stdout)
        assert js.returncode == 2 and data["exit_code"] == 2 and data["index_version"] == after["version"] + 1
        assert {r["template"]: r["result"] for r in data["results"]} == {"rb-minimal": "skipped", "rb-extra": "failed"}
    finally:
        kill_agents(key[0])


def test_nothing_to_build_over_to_uploads_a_resigned_index(tmp_path):
    from tests.test_server import Server

    key = make_key(tmp_path)
    server = None
    try:
        repo = init_repo(tmp_path / "repo", key)
        token = tmp_path / "token"
        token.write_text("tok-" + secrets.token_hex(16) + "\n")
        token.chmod(0o600)
        server = Server(repo, tmp_path / "logs", "--token-file", str(token))
        (tmp_path / "recipes").mkdir()
        home, fpr = key
        before = index_of(repo)
        proc = tmplbuild("rebuild", "--recipes", str(tmp_path / "recipes"), "--to", server.base, "--token-file",
                         str(token), "--key", fpr, "--gnupghome", str(home), "--keep", "2")
        assert proc.returncode == 2, proc.stdout + proc.stderr  # prune over --to: a usage error
        assert "prune" in proc.stdout and "not supported over --to" in proc.stdout
        after = index_of(repo)
        assert after["version"] == before["version"] + 1  # the index-only upload was accepted
        assert tmplbuild("repo", "verify", str(repo)).returncode == 0
        proc = tmplbuild("rebuild", "--recipes", str(tmp_path / "recipes"), "--to", server.base, "--token-file",
                         str(token), "--key", fpr, "--gnupghome", str(home))
        assert proc.returncode == 0, proc.stderr
        assert index_of(repo)["version"] == before["version"] + 2
    finally:
        if server is not None:
            server.stop()
        kill_agents(key[0])


# ---------------------------------------------------------------------------------------------- real builds


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp("rebuild")
    key = make_key(base)
    repo = init_repo(base / "repo", key)
    recipes = base / "recipes"
    write_recipes(recipes)
    yield {"base": base, "key": key, "repo": repo, "recipes": recipes, "cache": base / "cache"}
    kill_agents(key[0])


def entries(repo: Path, name: str) -> list[dict]:
    return [e for e in index_of(repo)["templates"] if e["name"] == name]


@pytest.mark.build
@pytest.mark.skipif(can_build() is not None, reason=str(can_build()))
def test_1_first_rebuild_publishes_both(world):
    proc = rebuild(world["recipes"], world["repo"], world["key"], world["cache"])
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    table = rows(proc)
    assert table["rb-minimal"][1] == "published" and table["rb-extra"][1] == "published"
    assert "(first version)" in table["rb-extra"][3]
    for name in ("rb-minimal", "rb-extra"):
        (e,) = entries(world["repo"], name)
        manifest = json.loads((world["repo"] / e["manifest"]["path"]).read_text())
        assert manifest["changelog"]["previous_version"] is None
        assert {p["name"] for p in manifest["changelog"]["added"]} == {p["name"] for p in manifest["packages"]}
        # Booted before it was published, and the result is signed with the manifest.
        test = manifest["test"]
        assert test["result"] == "pass" and test["sha256"] == e["files"][0]["sha256"]
        assert {m["manager"]: m["status"] for m in test["managers"]}["nspawn"] == "pass"
        assert all(m["status"] in ("pass", "skip") for m in test["managers"])
        assert {"boot", "network", "dns", "hostname"} <= {k for m in test["managers"] for k in m["checks"]}
    assert any(p["name"] == "less" for p in json.loads(
        (world["repo"] / entries(world["repo"], "rb-extra")[0]["manifest"]["path"]).read_text())["packages"])
    assert tmplbuild("repo", "verify", str(world["repo"])).returncode == 0


@pytest.mark.build
@pytest.mark.skipif(can_build() is not None, reason=str(can_build()))
def test_2_second_rebuild_builds_nothing_and_resigns(world):
    before = index_of(world["repo"])
    proc = rebuild(world["recipes"], world["repo"], world["key"], world["cache"])
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    table = rows(proc)
    for name in ("rb-minimal", "rb-extra"):
        assert table[name][1] == "skipped" and table[name][3] == "inputs unchanged", table
    assert "==> bootstrap" not in proc.stderr
    after = index_of(world["repo"])
    assert after["templates"] == before["templates"]
    assert after["version"] == before["version"] + 1
    assert after["expires"] > before["expires"] or after["generated"] > before["generated"]
    assert tmplbuild("repo", "verify", str(world["repo"])).returncode == 0


@pytest.mark.build
@pytest.mark.skipif(can_build() is not None, reason=str(can_build()))
def test_3_a_changed_recipe_gets_a_new_version_with_a_changelog(world):
    write_recipes(world["recipes"], extra=["less", "bzip2"])
    (old,) = entries(world["repo"], "rb-extra")
    proc = rebuild(world["recipes"], world["repo"], world["key"], world["cache"])
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    table = rows(proc)
    assert table["rb-minimal"][1] == "skipped"
    assert table["rb-extra"][1:3] == ["published", old["version"] + ".2"]
    assert len(entries(world["repo"], "rb-minimal")) == 1
    new = next(e for e in entries(world["repo"], "rb-extra") if e["version"] == old["version"] + ".2")
    manifest = json.loads((world["repo"] / new["manifest"]["path"]).read_text())
    log = manifest["changelog"]
    assert log["previous_version"] == old["version"]
    versions = {p["name"]: p["version"] for p in manifest["packages"]}
    assert {"name": "bzip2", "version": versions["bzip2"]} in log["added"]
    assert log["removed"] == [] and log["upgraded"] == [] and log["downgraded"] == []
    # By source package: bzip2's was already there (libbz2-1.0, which dpkg pre-depends on), so no source changed.
    assert log["sources"] == []
    assert table["rb-extra"][3].startswith(f"+{len(log['added'])} -0 ↑0 ↓0")
    assert tmplbuild("repo", "verify", str(world["repo"])).returncode == 0


@pytest.mark.build
@pytest.mark.skipif(can_build() is not None, reason=str(can_build()))
def test_4_a_broken_recipe_does_not_stop_the_others(world):
    write_recipes(world["recipes"], minimal_extra=["bzip2"], extra=["less", "Not_A_Package"])
    (old,) = entries(world["repo"], "rb-minimal")
    proc = rebuild(world["recipes"], world["repo"], world["key"], world["cache"])
    assert proc.returncode == 2, proc.stdout + proc.stderr[-3000:]
    table = rows(proc)
    assert table["rb-extra"][1] == "failed" and "Not_A_Package" in table["rb-extra"][3]
    assert table["rb-minimal"][1:3] == ["published", old["version"] + ".2"]
    assert len(entries(world["repo"], "rb-minimal")) == 2
    assert tmplbuild("repo", "verify", str(world["repo"])).returncode == 0


FAILING_UNIT = """
[[files]]
dest = "/etc/systemd/system/rb-broken.service"
content = "[Unit]\\nDescription=fails on purpose\\n\\n[Service]\\nType=oneshot\\nExecStart=/bin/false\\n\\n[Install]\\nWantedBy=multi-user.target\\n"

[[scripts]]
stage = "post-install"
run = "systemctl enable rb-broken.service"
"""


@pytest.mark.build
@pytest.mark.skipif(can_build() is not None, reason=str(can_build()))
def test_5_a_template_that_fails_its_container_test_is_not_published(world):
    """It builds, but a unit fails at boot: `tmplbuild test` fails it, nothing is published, and the last good
    version stays the newest in the signed index."""
    write_recipes(world["recipes"], minimal_extra=["bzip2"], extra=["less", "bzip2"], extra_toml=FAILING_UNIT)
    before = entries(world["repo"], "rb-extra")
    proc = rebuild(world["recipes"], world["repo"], world["key"], world["cache"])
    assert proc.returncode == 8, proc.stdout + proc.stderr[-3000:]
    table = rows(proc)
    assert table["rb-minimal"][1] == "skipped"
    assert table["rb-extra"][1] == "failed" and "template test" in table["rb-extra"][3], table
    assert "boot" in table["rb-extra"][3] and "not published" in table["rb-extra"][3]
    assert "rb-broken.service" in proc.stdout + proc.stderr  # the test's evidence names the failed unit
    assert entries(world["repo"], "rb-extra") == before
    assert tmplbuild("repo", "verify", str(world["repo"])).returncode == 0


@pytest.mark.build
@pytest.mark.skipif(can_build() is not None, reason=str(can_build()))
def test_6_rebuild_with_oci_pushes_and_signs_what_it_publishes(world, registry):  # noqa: F811
    """The weekly job with `--oci`: the new version's image is in the registry under both tags, its signatures are
    in the repository's lookaside, the signed manifest binds it, and the audit passes."""
    write_recipes(world["recipes"], minimal_extra=["bzip2", "less"])
    (world["recipes"] / "rb-extra.toml").unlink()  # one recipe is enough here
    prefix = f"{registry.host}/weekly"
    proc = rebuild(world["recipes"], world["repo"], world["key"], world["cache"], "--oci", prefix,
                   "--oci-insecure-registry")
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    table = rows(proc)
    assert table["rb-minimal"][1] == "published", table
    new = next(e for e in entries(world["repo"], "rb-minimal") if e["version"] == table["rb-minimal"][2])
    oci = json.loads((world["repo"] / new["manifest"]["path"]).read_text())["oci"]
    assert oci["registry"]["repository"] == f"{prefix}/rb-minimal"
    assert [f["format"] for f in new["files"]] == ["tar.zst", "tar.xz", "oci.tar", "lxc-meta.tar.xz", "spdx.json",
                                                   "cdx.json", "intoto.json", "tar.zst.delta", "tar.zst.delta"]
    # The weekly job's deltas: from the two newest versions published before it.
    earlier = sorted((e for e in entries(world["repo"], "rb-minimal") if e["version"] != new["version"]),
                     key=lambda e: (e["created"], e["version"]))
    assert [f["delta"]["base_version"] for f in new["files"][7:]] == [e["version"] for e in earlier[::-1][:2]]
    for tag in oci["registry"]["tags"]:
        raw = subprocess.run(["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{prefix}/rb-minimal:{tag}"],
                             capture_output=True, check=True).stdout
        assert "sha256:" + hashlib.sha256(raw).hexdigest() == oci["manifest_digest"]
    assert all((world["repo"] / s["path"]).is_file() for s in oci["registry"]["signatures"])
    assert tmplbuild("repo", "verify", str(world["repo"])).returncode == 0
