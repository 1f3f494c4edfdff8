"""Templates as signed OCI images, end to end through the real CLI: `publish --oci` pushes to a real Distribution
registry on 127.0.0.1 and signs with the index key, `oci trust` sets up stock skopeo, which then verifies (and
refuses what it must), `fetch --oci` pulls by the digest the signed index binds and installs the very bytes
that were published, and a registry serving anything else is refused with nothing installed. Upload to a
`tmplbuild serve` carries the lookaside signatures too."""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from tests.conftest import ROOT
from tests.oci_registry import registry  # noqa: F401 - a fixture
from tests.test_client import client_env, node_snapshot, run_client
from tests.test_repo import index_of, make_artifact, tmplbuild
from tests.test_server import Server, init_repo, kill_agents, make_key
from tmplbuild.oci import simplesign
from tmplbuild.oci.image import verify_archive
from tmplbuild.oci.record import parse as parse_record
from tmplbuild.recipe.model import Compression
from tmplbuild.sign import Signer

FORMATS = (Compression.ZSTD, Compression.OCI)
V1, V2 = "12-20261120", "12-20261127"


class World:
    pass


def manifest_of(repo: Path, version: str) -> dict:
    return json.loads(next((repo / "templates/demo" / version).glob("*.manifest.json")).read_text())


def skopeo(w, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["skopeo", "--policy", str(w.accept_all), *args], capture_output=True, text=True,
                          timeout=120)


def stock_copy(w, ref: str, out: Path, trust: Path | None = None) -> subprocess.CompletedProcess[str]:
    """What a node admin runs after `tmplbuild oci trust`: stock skopeo under the written policy."""
    trust = trust or w.trust
    return subprocess.run(["skopeo", "--policy", str(trust / "policy.json"), "--registries.d",
                           str(trust / "registries.d"), "copy", "--src-tls-verify=false", "--remove-signatures",
                           f"docker://{ref}", f"oci-archive:{out}"], capture_output=True, text=True, timeout=120)


def oci_publish(w, repo: Path, manifest: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    home, fpr = w.key
    return tmplbuild("publish", "--skip-test", str(manifest), "--repo", str(repo), "--key", fpr, "--gnupghome",
                     str(home), "--oci", w.prefix, "--oci-insecure-registry", *extra)


@pytest.fixture(scope="module")
def w(registry, tmp_path_factory):  # noqa: F811
    w = World()
    w.tmp = tmp_path_factory.mktemp("oci-publish")
    w.registry = registry
    w.prefix = f"{registry.host}/tmplbuild"
    w.key = make_key(w.tmp)
    w.repo = init_repo(w.tmp / "repo", w.key)
    w.out = w.tmp / "out"
    w.out.mkdir()
    w.v1 = make_artifact(w.out, "demo", V1, formats=FORMATS, payload="one\n")
    w.v2 = make_artifact(w.out, "demo", V2, formats=FORMATS, payload="two\n")
    w.accept_all = w.tmp / "accept-all.json"
    w.accept_all.write_text('{"default": [{"type": "insecureAcceptAnything"}]}')
    w.first = oci_publish(w, w.repo, w.v1)
    w.server = Server(w.repo, w.tmp / "logs")
    w.trust = w.tmp / "trust"
    w.trust_run = tmplbuild("oci", "trust", "--url", w.server.base, "--key", str(w.tmp / "pub.asc"), "--fingerprint",
                            w.key[1], "--registry", w.prefix, "--out", str(w.trust))
    try:
        yield w
    finally:
        w.server.stop()
        kill_agents(w.key[0])


def test_publish_pushes_signs_and_the_signed_manifest_binds_the_image(w):
    assert w.first.returncode == 0, w.first.stderr
    assert "TLS verification is OFF" in w.first.stderr  # said every time it is turned off
    assert f"pushed demo {V1} amd64: {w.prefix}/demo:{{{V1}-amd64,latest-amd64}}, signed" in w.first.stdout
    entry = index_of(w.repo)["templates"][0]
    assert [f["format"] for f in entry["files"]] == ["tar.zst", "oci.tar"]
    rec = parse_record(manifest_of(w.repo, V1)["oci"])
    assert rec.registry.repository == f"{w.prefix}/demo" and rec.registry.tags == (f"{V1}-amd64", "latest-amd64")
    # The registry holds exactly the image the manifest names, under both tags.
    for tag in rec.registry.tags:
        proc = skopeo(w, "inspect", "--tls-verify=false", "--raw", f"docker://{rec.registry.repository}:{tag}")
        assert proc.returncode == 0, proc.stderr
        assert "sha256:" + hashlib.sha256(proc.stdout.encode()).hexdigest() == rec.image.manifest_digest
    verify_archive(w.repo / f"templates/demo/{V1}/{rec.file}", rec.image)
    assert [s.identity for s in rec.registry.signatures] == [f"{rec.registry.repository}:{t}" for t in
                                                             rec.registry.tags]
    assert all((w.repo / s.path).is_file() for s in rec.registry.signatures)
    audit = tmplbuild("repo", "verify", str(w.repo))
    assert audit.returncode == 0, audit.stdout + audit.stderr


def test_stock_skopeo_verifies_it_under_the_policy_oci_trust_writes(w, tmp_path):
    assert w.trust_run.returncode == 0, w.trust_run.stderr
    assert {p.name for p in w.trust.rglob("*") if p.is_file()} == {"policy.json", "tmplbuild.yaml", "tmplbuild.gpg"}
    for tag in (f"{V1}-amd64", "latest-amd64"):
        proc = stock_copy(w, f"{w.prefix}/demo:{tag}", tmp_path / f"{tag}.tar")
        assert proc.returncode == 0, proc.stderr


def test_stock_skopeo_refuses_another_key_an_unsigned_image_and_another_tag(w, tmp_path):
    other_home = tmp_path / "other"
    other = make_key(other_home)
    foreign = tmp_path / "foreign"
    proc = tmplbuild("oci", "trust", "--url", w.server.base, "--key", str(other_home / "pub.asc"), "--fingerprint",
                     other[1], "--registry", w.prefix, "--out", str(foreign))
    kill_agents(other[0])
    assert proc.returncode == 0, proc.stderr
    refused = stock_copy(w, f"{w.prefix}/demo:{V1}-amd64", tmp_path / "a.tar", foreign)
    assert refused.returncode != 0 and "Source image rejected" in refused.stderr, refused.stderr
    # The same digest under a tag no signature names, and an image nobody signed.
    src = f"docker://{w.prefix}/demo:{V1}-amd64"
    assert skopeo(w, "copy", "--src-tls-verify=false", "--dest-tls-verify=false", src,
                  f"docker://{w.prefix}/demo:other").returncode == 0
    proc = stock_copy(w, f"{w.prefix}/demo:other", tmp_path / "b.tar")
    assert proc.returncode != 0 and "is not accepted" in proc.stderr, proc.stderr
    assert skopeo(w, "copy", "--src-tls-verify=false", "--dest-tls-verify=false", src,
                  f"docker://{w.prefix}/unsigned:1").returncode == 0
    proc = stock_copy(w, f"{w.prefix}/unsigned:1", tmp_path / "c.tar")
    assert proc.returncode != 0 and "no signature exists" in proc.stderr, proc.stderr
    assert not (tmp_path / "b.tar").exists() and not (tmp_path / "c.tar").exists()


def node(w, tmp: Path) -> tuple[dict[str, str], Path, Path]:
    env = client_env(tmp, tmp / "config", tmp / "state")
    return env, tmp / "cache", tmp / "state"


def fetch_oci(w, env: dict[str, str], dest: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return run_client(env, "fetch", "demo", "--oci", "--oci-insecure-registry", "--dest", str(dest), "--url",
                      w.server.base, "--key", str(w.tmp / "pub.asc"), "--fingerprint", w.key[1], *extra)


def test_fetch_oci_installs_the_published_bytes_pulled_by_the_signed_digest(w, tmp_path):
    env, dest, _ = node(w, tmp_path)
    proc = fetch_oci(w, env, dest, "--version", V1)
    assert proc.returncode == 0, proc.stderr
    got = dest / f"demo_{V1}_amd64.oci.tar"
    published = w.repo / f"templates/demo/{V1}/demo_{V1}_amd64.oci.tar"
    assert got.read_bytes() == published.read_bytes()
    assert f"pulled from {w.prefix}/demo@sha256:" in proc.stdout and "and verified" in proc.stdout
    assert sorted(p.name for p in dest.iterdir()) == [got.name]  # no .part, no pulled layout left
    again = fetch_oci(w, env, dest, "--version", V1)
    assert again.returncode == 0 and "already present and verified" in again.stdout


def registry_blob(w, digest: str) -> Path:
    hexd = digest.removeprefix("sha256:")
    return w.registry.base / "data/docker/registry/v2/blobs/sha256" / hexd[:2] / hexd / "data"


def test_fetch_oci_refuses_a_registry_that_serves_other_bytes_and_installs_nothing(w, tmp_path):
    env, dest, state = node(w, tmp_path)
    rec = parse_record(manifest_of(w.repo, V1)["oci"])
    layer = registry_blob(w, rec.image.layer_digest)
    good = layer.read_bytes()
    try:
        layer.write_bytes(good[:100] + bytes([good[100] ^ 1]) + good[101:])  # the registry's disk, flipped
        dest.mkdir()
        before = node_snapshot(dest, state)
        proc = fetch_oci(w, env, dest, "--version", V1)
        assert proc.returncode == 3, proc.stdout + proc.stderr
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith("tmplbuild: oci digest: ") and "did not match" in last, proc.stderr
        assert node_snapshot(dest, state) == before and list(dest.iterdir()) == []
    finally:
        layer.write_bytes(good)


def test_a_failed_push_publishes_nothing(w, tmp_path):
    repo = init_repo(tmp_path / "repo", w.key)
    before = (repo / "index.json").read_bytes()
    home, fpr = w.key
    proc = tmplbuild("publish", "--skip-test", str(w.v1), "--repo", str(repo), "--key", fpr, "--gnupghome",
                     str(home), "--oci", "127.0.0.1:1/tmplbuild", "--oci-insecure-registry")
    assert proc.returncode == 5, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("tmplbuild: registry: ")
    assert (repo / "index.json").read_bytes() == before
    assert not (repo / "templates").exists() or not any((repo / "templates").rglob("*.*"))
    assert not (repo / "sigstore").exists() or not any(p.is_file() for p in (repo / "sigstore").rglob("*"))


def test_oci_needs_an_image_in_the_build(w, tmp_path):
    plain = make_artifact(tmp_path, "plain", V1)
    repo = init_repo(tmp_path / "repo", w.key)
    proc = oci_publish(w, repo, plain)
    assert proc.returncode == 2 and "has no OCI image" in proc.stderr, proc.stderr


def test_a_newer_version_takes_the_moving_tag_and_its_signature(w, tmp_path):
    """After v2, the moving tag's signature of v1 is gone: a registry pointing latest-amd64 back at v1 fails
    stock skopeo, while v1's own version tag still verifies."""
    second = oci_publish(w, w.repo, w.v2)
    assert second.returncode == 0, second.stderr
    old, new = parse_record(manifest_of(w.repo, V1)["oci"]), parse_record(manifest_of(w.repo, V2)["oci"])
    moving = [s for s in old.registry.signatures if s.identity.endswith(":latest-amd64")]
    assert moving and not (w.repo / moving[0].path).exists()
    assert all((w.repo / s.path).exists() for s in new.registry.signatures)
    assert stock_copy(w, f"{w.prefix}/demo:latest-amd64", tmp_path / "new.tar").returncode == 0
    assert stock_copy(w, f"{w.prefix}/demo:{V1}-amd64", tmp_path / "old.tar").returncode == 0
    rolled = skopeo(w, "copy", "--src-tls-verify=false", "--dest-tls-verify=false",
                    f"docker://{w.prefix}/demo:{V1}-amd64", f"docker://{w.prefix}/demo:latest-amd64")
    assert rolled.returncode == 0, rolled.stderr
    try:
        proc = stock_copy(w, f"{w.prefix}/demo:latest-amd64", tmp_path / "rolled.tar")
        assert proc.returncode != 0 and "Source image rejected" in proc.stderr, proc.stderr
    finally:
        skopeo(w, "copy", "--src-tls-verify=false", "--dest-tls-verify=false",
               f"docker://{w.prefix}/demo:{V2}-amd64", f"docker://{w.prefix}/demo:latest-amd64")
    audit = tmplbuild("repo", "verify", str(w.repo))
    assert audit.returncode == 0, audit.stdout + audit.stderr


def test_publish_to_a_server_uploads_the_signatures_with_the_template(w, tmp_path):
    home, fpr = w.key
    repo = init_repo(tmp_path / "repo", w.key)
    token = tmp_path / "token"
    token.write_text("t" * 32 + "\n")
    token.chmod(0o600)
    server = Server(repo, tmp_path / "logs", "--token-file", str(token))
    try:
        art = make_artifact(tmp_path / "out", "remote", V1, formats=FORMATS)
        proc = tmplbuild("publish", "--skip-test", str(art), "--to", server.base, "--token-file", str(token),
                         "--key", fpr, "--gnupghome", str(home), "--oci", w.prefix, "--oci-insecure-registry")
        assert proc.returncode == 0, proc.stderr
        rec = parse_record(json.loads(next((repo / "templates/remote" / V1).glob("*.manifest.json")).read_text())["oci"])
        assert rec.registry.signatures and all((repo / s.path).is_file() for s in rec.registry.signatures)
        api = requests.get(server.url("/api/v1/templates"), timeout=10).json()
        assert api["oci"][0]["reference"] == rec.by_digest()
        page = requests.get(server.url("/"), timeout=10).text
        assert f"{w.prefix}/remote:{V1}-amd64" in page and "tmplbuild oci trust" in page
        trust = tmp_path / "trust"
        assert tmplbuild("oci", "trust", "--url", server.base, "--key", str(w.tmp / "pub.asc"), "--fingerprint", fpr,
                         "--registry", w.prefix, "--out", str(trust)).returncode == 0
        ok = stock_copy(w, f"{w.prefix}/remote:{V1}-amd64", tmp_path / "r.tar", trust)
        assert ok.returncode == 0, ok.stderr
    finally:
        server.stop()


def test_repo_verify_checks_each_lookaside_signature_as_skopeo_would(w, tmp_path):
    """A signature file replaced by a good signature of another image (or by garbage) is a finding naming it."""
    repo = tmp_path / "copy"
    shutil.copytree(w.repo, repo, ignore=shutil.ignore_patterns(".*"))
    v1 = parse_record(manifest_of(repo, V1)["oci"]).registry.signatures[0]
    other = v1.identity.rsplit(":", 1)[0] + ":other"
    with Signer(*w.key) as signer:  # good, by the index key, but for another tag
        (repo / v1.path).write_bytes(simplesign.sign(signer, other, v1.digest))
    proc = tmplbuild("repo", "verify", str(repo))
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert f"{v1.path}: oci signature: signs {other} as {v1.digest}, expected {v1.identity}" in proc.stderr
    (repo / v1.path).write_bytes(b"not a signature")
    proc = tmplbuild("repo", "verify", str(repo))
    assert proc.returncode == 3 and f"{v1.path}: oci signature: " in proc.stderr, proc.stderr


def test_carrying_over_a_rotation_re_signs_the_images_with_the_new_key(w, keys, tmp_path):
    """After root 2 drops the key that signed the images, `repo resign --carry-over` signs them again with the new
    online key: stock skopeo set up with the new key accepts them, and the audit passes."""
    from tests.test_repo_root import install, who

    repo = tmp_path / "repo"
    repo.mkdir()
    install(repo, keys, 1, ("online-1",))
    assert tmplbuild("repo", "init", str(repo), "--gnupghome", str(keys.home), "--id", "test-repo", "--key",
                     keys["online-1"]).returncode == 0
    home, fpr = who(keys, "online-1")
    art = make_artifact(tmp_path / "out", "rotated", V1, formats=FORMATS)
    proc = tmplbuild("publish", "--skip-test", str(art), "--repo", str(repo), "--key", fpr, "--gnupghome", str(home),
                     "--oci", w.prefix, "--oci-insecure-registry")
    assert proc.returncode == 0, proc.stderr
    install(repo, keys, 2, ("online-2",))
    new_key = tmp_path / "online-2.asc"
    new_key.write_bytes(keys.armored[keys["online-2"]])
    trust = tmp_path / "trust"
    assert tmplbuild("oci", "trust", "--url", "http://127.0.0.1:9/unused", "--lookaside", f"file://{repo}/sigstore",
                     "--key", str(new_key), "--fingerprint", keys["online-2"], "--registry", w.prefix, "--out",
                     str(trust)).returncode == 0
    ref = f"{w.prefix}/rotated:{V1}-amd64"
    before = stock_copy(w, ref, tmp_path / "before.tar", trust)
    assert before.returncode != 0 and "Source image rejected" in before.stderr, before.stderr
    proc = tmplbuild("repo", "resign", str(repo), "--carry-over", "--key", keys["online-2"], "--gnupghome",
                     str(keys.home))
    assert proc.returncode == 0, proc.stderr
    assert "and 2 image signature(s) (sigstore/)" in proc.stderr, proc.stderr
    after = stock_copy(w, ref, tmp_path / "after.tar", trust)
    assert after.returncode == 0, after.stderr
    audit = tmplbuild("repo", "verify", str(repo))
    assert audit.returncode == 0, audit.stdout + audit.stderr


PREVIOUS = "a28090d"  # the last tmplbuild before OCI data appeared in repositories


def test_the_previous_tmplbuild_still_lists_fetches_and_verifies_a_repository_with_images(w, tmp_path):
    """Signed formats evolve without stranding users: the tmplbuild before this change, run from its own source,
    reads the index (an oci.tar in `files`), fetches the tarball and verifies it, against this repository."""
    old = tmp_path / "old"
    old.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", PREVIOUS, "tmplbuild"], capture_output=True)
    if archive.returncode != 0:
        pytest.skip(f"no git history with {PREVIOUS} here: {archive.stderr.decode().strip()[:200]}")
    subprocess.run(["tar", "-x", "-C", str(old)], input=archive.stdout, check=True)
    env, dest, _ = node(w, tmp_path)
    env["PYTHONPATH"] = str(old)
    pins = ["--url", w.server.base, "--key", str(w.tmp / "pub.asc"), "--fingerprint", w.key[1]]

    def previous(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "tmplbuild", *args], cwd=tmp_path, capture_output=True,
                              text=True, env=env, timeout=120)

    assert "oci" not in previous("fetch", "--help").stdout  # really the previous client
    listing = previous("list", *pins)
    assert listing.returncode == 0 and V2 in listing.stdout, listing.stderr
    fetched = previous("fetch", "demo", "--dest", str(dest), *pins)
    assert fetched.returncode == 0, fetched.stderr
    got = dest / f"demo_{V2}_amd64.tar.zst"
    assert got.read_bytes() == (w.repo / f"templates/demo/{V2}/{got.name}").read_bytes()
    assert previous("verify", str(got), *pins).returncode == 0


def test_fetch_oci_from_an_unreachable_registry_is_a_transport_failure(w, tmp_path):
    env, dest, state = node(w, tmp_path)
    w.registry.stop()  # the last test of the module: the registry stays down
    proc = fetch_oci(w, env, dest, "--version", V1)
    assert proc.returncode == 5, proc.stdout + proc.stderr
    assert "registry" in proc.stderr and "cannot reach" in proc.stderr, proc.stderr
    assert not dest.exists() or list(dest.iterdir()) == []
