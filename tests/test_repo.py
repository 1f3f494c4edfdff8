"""The signed repository on disk: what a maintainer runs (key, repo init, publish, verify, prune, resign) and
what third-party tools make of the result (gpgv + sha256sum, gpg --verify, systemd-pull)."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, gpg
from tmplbuild.builder.pack import pack
from tmplbuild.manifest import Package
from tmplbuild.manifest import parse as parse_manifest
from tmplbuild.oci import record
from tmplbuild.oci.image import ImageMeta
from tmplbuild.recipe.model import Compression
from tmplbuild.repo import index as idx
from tmplbuild.sbom import documents

EPOCH = 1_780_000_000


def tmplbuild(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tmplbuild", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **(env or {})})


def make_artifact(out: Path, name: str = "demo", version: str = "12-20261120", arch: str = "amd64",
                  formats: tuple[Compression, ...] = (Compression.ZSTD,), payload: str = "hello\n",
                  packages: tuple[Package, ...] | None = None, blob: bytes = b"",
                  created: str = "2026-05-28T00:00:00Z") -> Path:
    """A small template exactly as `tmplbuild build` lays it out: tarball(s) + manifest. With `packages`, the
    manifest lists them and the SBOMs and provenance are written as the builder writes them. `blob`: the content
    of /usr/lib/blob (a template's bulk, the same from one version to the next)."""
    tree = out / f"tree-{name}-{version}-{arch}"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc/os-release").write_text('NAME="Demo"\nVERSION_ID="12"\n')
    (tree / "etc/motd").write_text(payload)
    if blob:
        (tree / "usr/lib").mkdir(parents=True)
        (tree / "usr/lib/blob").write_bytes(blob)
    stem = f"{name}_{version}_{arch}"
    image = ImageMeta(name=name, version=version, arch=arch, description="demo template",
                      revision="sha256:" + "0" * 64, epoch=EPOCH)
    _, _, artifacts = pack(tree, [(f, out / f"{stem}.{f.file_format}") for f in formats], EPOCH, oci=image)
    shutil.rmtree(tree)
    manifest = {
        "schema": 1, "name": name, "version": version, "arch": arch, "distribution": "debian", "release": "12",
        "suite": "bookworm", "variant": "demo", "description": "demo template", "created": created,
        "source_date_epoch": EPOCH, "build": {"input_hash": "sha256:" + "0" * 64}, "packages": [],
        "artifacts": [{"file": a.path.name, "format": a.format, "size": a.size, "sha256": a.sha256,
                       "sha512": a.sha512} for a in artifacts],
    }
    manifest.update({"oci": record.built(a.path.name, a.oci) for a in artifacts if a.oci is not None})
    path = out / f"{stem}.manifest.json"
    if packages is not None:
        manifest["packages"] = [p.doc() for p in packages]
        m = parse_manifest(json.dumps(manifest).encode())
        made = {idx.SPDX_FORMAT: documents.spdx(m), idx.CYCLONEDX_FORMAT: documents.cyclonedx(m)}
        subjects = [(a.file, a.sha256) for a in m.artifacts] + [
            (f"{stem}.{fmt}", hashlib.sha256(data).hexdigest()) for fmt, data in made.items()]
        made[idx.PROVENANCE_FORMAT] = documents.provenance(
            m, subjects, [documents.Release("http://mirror.invalid/debian/dists/bookworm/InRelease", "1" * 64)],
            [f.file_format for f in formats])
        for fmt, data in made.items():
            (out / f"{stem}.{fmt}").write_bytes(data)
            manifest["artifacts"].append({"file": f"{stem}.{fmt}", "format": fmt, "size": len(data),
                                          "sha256": hashlib.sha256(data).hexdigest(),
                                          "sha512": hashlib.sha512(data).hexdigest()})
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return path


@pytest.fixture
def key(tmp_path):
    """A maintainer's signing key made with `tmplbuild key generate`, in its own GNUPGHOME."""
    home = tmp_path / "gnupg"
    proc = tmplbuild("key", "generate", "--name", "Test Templates <t@example.invalid>", "--gnupghome", str(home),
                     "--out", str(tmp_path / "pub.asc"))
    assert proc.returncode == 0, proc.stderr
    fpr = proc.stdout.strip()
    yield home, fpr
    subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "all"], capture_output=True)


@pytest.fixture
def repo(tmp_path, key):
    home, fpr = key
    root = tmp_path / "repo"
    proc = tmplbuild("repo", "init", str(root), "--key", fpr, "--gnupghome", str(home), "--id", "test-repo")
    assert proc.returncode == 0, proc.stderr
    return root


def publish(root: Path, key, *artifacts: Path, env=None) -> subprocess.CompletedProcess[str]:
    home, fpr = key
    return tmplbuild("publish", "--skip-test", *map(str, artifacts), "--repo", str(root), "--key", fpr, "--gnupghome", str(home),
                     env=env)


def index_of(root: Path) -> dict:
    return json.loads((root / "index.json").read_text())


def test_key_generate_writes_public_key_only_and_prints_the_fingerprint(tmp_path, key):
    home, fpr = key
    assert len(fpr) == 40 and all(c in "0123456789ABCDEF" for c in fpr)
    pub = (tmp_path / "pub.asc").read_bytes()
    assert pub.startswith(b"-----BEGIN PGP PUBLIC KEY BLOCK-----") and b"PRIVATE" not in pub
    (tmp_path / "show").mkdir(mode=0o700)
    shown = subprocess.run(["gpg", "--homedir", str(tmp_path / "show"), "--show-keys", "--with-colons"],
                           input=pub, capture_output=True).stdout.decode()
    assert f"fpr:::::::::{fpr}:" in shown
    assert shown.splitlines()[0].split(":")[3] == "22"  # public key algorithm 22: EdDSA (ed25519)


def test_key_generate_refuses_a_gnupghome_inside_the_project():
    proc = tmplbuild("key", "generate", "--name", "x <x@example.invalid>", "--gnupghome", str(ROOT / "keys/home"))
    assert proc.returncode == 2 and "gnupghome" in proc.stderr
    assert not (ROOT / "keys/home").exists()


def test_init_shows_the_repository_id_and_where_a_default_one_came_from(tmp_path, key):
    home, fpr = key
    named = tmplbuild("repo", "init", str(tmp_path / "named"), "--key", fpr, "--gnupghome", str(home),
                      "--id", "example-templates")
    assert named.returncode == 0 and "repository id: example-templates" in named.stdout.splitlines()
    assert "note" not in named.stderr
    default = tmplbuild("repo", "init", str(tmp_path / "My-Repo"), "--key", fpr, "--gnupghome", str(home))
    assert default.returncode == 0 and "repository id: my-repo" in default.stdout.splitlines()
    note = default.stderr.strip().splitlines()[-1]
    assert "'my-repo' was taken from the directory's name" in note and "--id ID" in note and "pin it" in note


def test_init_makes_a_signed_empty_index_and_pins_the_key(repo, key):
    _, fpr = key
    doc = index_of(repo)
    assert (doc["repo_id"], doc["version"], doc["templates"]) == ("test-repo", 1, [])
    assert (repo / f"keys/{fpr}.asc").exists()
    assert tmplbuild("repo", "verify", str(repo)).returncode == 0


def test_publish_lays_out_the_design_layout_with_signed_index(tmp_path, repo, key):
    manifest = make_artifact(tmp_path / "out")
    proc = publish(repo, key, manifest)
    assert proc.returncode == 0, proc.stderr
    d = repo / "templates/demo/12-20261120"
    assert sorted(p.name for p in d.iterdir()) == [
        "SHA256SUMS", "SHA256SUMS.gpg", "demo_12-20261120_amd64.manifest.json",
        "demo_12-20261120_amd64.manifest.json.asc", "demo_12-20261120_amd64.tar.zst",
        "demo_12-20261120_amd64.tar.zst.asc"]
    doc = index_of(repo)
    assert doc["version"] == 2
    entry = doc["templates"][0]
    data = (d / "demo_12-20261120_amd64.tar.zst").read_bytes()
    assert (entry["name"], entry["version"], entry["arch"], entry["path"]) == \
        ("demo", "12-20261120", "amd64", "templates/demo/12-20261120/demo_12-20261120_amd64.tar.zst")
    assert (entry["size"], entry["sha256"], entry["sha512"]) == \
        (len(data), hashlib.sha256(data).hexdigest(), hashlib.sha512(data).hexdigest())
    assert entry["manifest"]["sha256"] == hashlib.sha256(manifest.read_bytes()).hexdigest()
    assert entry["input_hash"] == "sha256:" + "0" * 64
    assert doc["expires"] > doc["generated"]
    sums = (d / "SHA256SUMS").read_text()
    assert sums.endswith("\n") and f"{hashlib.sha256(data).hexdigest()}  demo_12-20261120_amd64.tar.zst\n" in sums
    assert not list(repo.rglob(".*.part"))


def test_gpgv_and_sha256sum_verify_a_published_directory(tmp_path, repo, key):
    home, fpr = key
    publish(repo, key, make_artifact(tmp_path / "out"))
    keyring = tmp_path / "keyring.gpg"
    assert tmplbuild("key", "export", "--key", fpr, "--gnupghome", str(home), "--out-dir", str(tmp_path)).returncode == 0
    shutil.copy(tmp_path / f"{fpr}.gpg", keyring)
    d = repo / "templates/demo/12-20261120"
    subprocess.run(["gpgv", "--keyring", str(keyring), "SHA256SUMS.gpg", "SHA256SUMS"], cwd=d, check=True,
                   capture_output=True)
    subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=d, check=True, capture_output=True)
    # The OpenVZ habit: gpg --verify FILE.asc FILE, by hand, for each file.
    subprocess.run(["gpgv", "--keyring", str(keyring), "demo_12-20261120_amd64.tar.zst.asc",
                    "demo_12-20261120_amd64.tar.zst"], cwd=d, check=True, capture_output=True)
    (d / "demo_12-20261120_amd64.tar.zst").write_bytes(b"tampered")
    assert subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=d, capture_output=True).returncode != 0


def test_repo_verify_finds_a_tampered_file_a_missing_signature_and_an_unlisted_file(tmp_path, repo, key):
    publish(repo, key, make_artifact(tmp_path / "out"))
    d = repo / "templates/demo/12-20261120"
    tarball = d / "demo_12-20261120_amd64.tar.zst"
    data = bytearray(tarball.read_bytes())
    data[100] ^= 1
    tarball.write_bytes(bytes(data))
    (d / "demo_12-20261120_amd64.manifest.json.asc").unlink()
    (repo / "templates/stray.tar.zst").write_bytes(b"x")
    proc = tmplbuild("repo", "verify", str(repo))
    assert proc.returncode == 3
    lines = proc.stderr.strip().splitlines()
    assert any("demo_12-20261120_amd64.tar.zst: sha256" in ln for ln in lines)
    assert any("demo_12-20261120_amd64.tar.zst.asc: signature" in ln for ln in lines)
    assert any("manifest.json.asc: missing" in ln for ln in lines)
    assert any("templates/stray.tar.zst: served but not listed" in ln for ln in lines)
    assert all(ln.startswith("tmplbuild: repo verify: ") for ln in lines)


def other_key(tmp_path: Path, name: str, *extra: str) -> tuple[Path, str]:
    home = tmp_path / name
    home.mkdir(mode=0o700)
    gpg(home, *extra, "--quick-gen-key", f"{name} <{name}@example.invalid>", "ed25519", "sign", "1d")
    fpr = [ln.split(":")[9] for ln in gpg(home, "--with-colons", "--list-keys").stdout.decode().splitlines()
           if ln.startswith("fpr:")][0]
    return home, fpr


def test_index_signed_by_an_unpinned_key_is_refused(tmp_path, repo, key):
    home, fpr = other_key(tmp_path, "intruder")
    (repo / "index.json.asc").write_bytes(gpg(home, "--armor", "--detach-sign", input=(repo / "index.json").read_bytes()).stdout)
    proc = tmplbuild("repo", "verify", str(repo))
    assert proc.returncode == 3 and "not pinned" in proc.stderr
    # Verifying with the intruder's key file but pinning the real fingerprint is refused too.
    (tmp_path / "intruder.asc").write_bytes(gpg(home, "--armor", "--export").stdout)
    proc = tmplbuild("repo", "verify", str(repo), "--key", str(tmp_path / "intruder.asc"), "--fingerprint", key[1])
    assert proc.returncode != 0
    subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "all"], capture_output=True)


def test_index_signed_by_an_expired_key_is_refused(tmp_path, repo):
    then = ("--faked-system-time", "20200101T000000!")
    home, fpr = other_key(tmp_path, "expired", *then)
    (repo / "index.json.asc").write_bytes(
        gpg(home, *then, "--armor", "--detach-sign", input=(repo / "index.json").read_bytes()).stdout)
    (tmp_path / "expired.asc").write_bytes(gpg(home, "--armor", "--export").stdout)
    proc = tmplbuild("repo", "verify", str(repo), "--key", str(tmp_path / "expired.asc"))
    assert proc.returncode == 3 and "expired" in proc.stderr
    subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "all"], capture_output=True)


def test_index_signed_by_a_revoked_key_is_refused(tmp_path, repo, key):
    home, fpr = key
    # gpg saved a revocation certificate when it made the key; its first line is guarded by a leading ':'.
    cert = (home / "openpgp-revocs.d" / f"{fpr}.rev").read_text().replace("\n:-----BEGIN", "\n-----BEGIN")
    gpg(home, "--import", input=cert.encode())
    revoked = tmp_path / "revoked.asc"
    revoked.write_bytes(gpg(home, "--armor", "--export", fpr).stdout)
    proc = tmplbuild("repo", "verify", str(repo), "--key", str(revoked))
    assert proc.returncode == 3 and "revoked" in proc.stderr


def test_publish_refuses_an_artifact_changed_after_its_build(tmp_path, repo, key):
    manifest = make_artifact(tmp_path / "out")
    tarball = manifest.with_name("demo_12-20261120_amd64.tar.zst")
    tarball.write_bytes(tarball.read_bytes() + b"\0")
    before = (repo / "index.json").read_bytes()
    proc = publish(repo, key, tarball)
    assert proc.returncode == 3 and "artifact hash" in proc.stderr
    assert (repo / "index.json").read_bytes() == before
    assert not (repo / "templates/demo/12-20261120/demo_12-20261120_amd64.tar.zst").exists()


def test_publish_refuses_a_key_home_inside_the_repository_and_an_unknown_key(tmp_path, repo, key):
    home, fpr = key
    inside = repo / ".keys"
    shutil.copytree(home, inside, ignore=shutil.ignore_patterns("S.*"))
    proc = tmplbuild("publish", "--skip-test", str(make_artifact(tmp_path / "out")), "--repo", str(repo), "--key", fpr,
                     "--gnupghome", str(inside))
    assert proc.returncode == 2 and "gnupghome" in proc.stderr
    other_home, other_fpr = other_key(tmp_path, "other")
    proc = tmplbuild("publish", "--skip-test", str(make_artifact(tmp_path / "out2")), "--repo", str(repo), "--key", other_fpr,
                     "--gnupghome", str(other_home))
    assert proc.returncode == 2 and "not one of the repository's keys" in proc.stderr
    subprocess.run(["gpgconf", "--homedir", str(other_home), "--kill", "all"], capture_output=True)


@pytest.mark.parametrize("fault", ["before-files", "before-index"])
def test_interrupted_publish_leaves_the_previous_index_and_templates_intact(tmp_path, repo, key, fault):
    assert publish(repo, key, make_artifact(tmp_path / "v1")).returncode == 0
    before = (repo / "index.json").read_bytes(), (repo / "index.json.asc").read_bytes()
    proc = publish(repo, key, make_artifact(tmp_path / "v2", version="12-20261130", payload="new\n"),
                   env={"TMPLBUILD_FAULT": fault})
    assert proc.returncode == 137  # killed without any clean-up
    assert ((repo / "index.json").read_bytes(), (repo / "index.json.asc").read_bytes()) == before
    findings = tmplbuild("repo", "verify", str(repo)).stderr
    assert "templates/demo/12-20261120/" not in findings  # the published template still checks out completely
    # The next publish finishes the job, and the repository is clean again.
    assert publish(repo, key, make_artifact(tmp_path / "v2b", version="12-20261130", payload="new\n")).returncode == 0
    assert tmplbuild("repo", "verify", str(repo)).returncode == 0
    assert index_of(repo)["version"] == 3


def test_two_concurrent_publishers_are_serialised(tmp_path, repo, key):
    home, fpr = key
    procs = [subprocess.Popen([sys.executable, "-m", "tmplbuild", "publish", "--skip-test",
                               str(make_artifact(tmp_path / f"o{i}", name=f"t{i}")), "--repo", str(repo), "--key",
                               fpr, "--gnupghome", str(home)], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE) for i in range(2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    doc = index_of(repo)
    assert doc["version"] == 3 and sorted(t["name"] for t in doc["templates"]) == ["t0", "t1"]
    assert tmplbuild("repo", "verify", str(repo)).returncode == 0


def test_republishing_the_same_build_is_a_no_op_and_a_changed_one_is_refused(tmp_path, repo, key):
    manifest = make_artifact(tmp_path / "out")
    assert publish(repo, key, manifest).returncode == 0
    before = {p: p.read_bytes() for p in repo.rglob("*") if p.is_file() and p.name != ".lock"}
    again = publish(repo, key, manifest)
    assert again.returncode == 0 and "unchanged" in again.stdout
    assert again.stdout.splitlines()[-1].startswith(f"nothing new to publish: index version {index_of(repo)['version']} unchanged")
    after = {p: p.read_bytes() for p in repo.rglob("*") if p.is_file() and p.name != ".lock"}
    assert after == before  # not one byte rewritten: the index is not re-signed, its version not bumped
    other = make_artifact(tmp_path / "other", payload="different\n")
    proc = publish(repo, key, other)
    assert proc.returncode == 2 and "already published with other content" in proc.stderr


def test_prune_keeps_the_newest_and_resign_bumps_version_and_expiry(tmp_path, repo, key):
    home, fpr = key
    for i, version in enumerate(("12-20261101", "12-20261108", "12-20261115")):
        m = make_artifact(tmp_path / f"o{i}", version=version, payload=f"{i}\n")
        doc = json.loads(m.read_text())
        doc["created"] = f"2026-11-{1 + 7 * i:02d}T00:00:00Z"
        m.write_text(json.dumps(doc))
        assert publish(repo, key, m).returncode == 0
    proc = tmplbuild("repo", "prune", str(repo), "--keep", "1", "--key", fpr, "--gnupghome", str(home))
    assert proc.returncode == 0, proc.stderr
    assert [t["version"] for t in index_of(repo)["templates"]] == ["12-20261115"]
    assert sorted(p.name for p in (repo / "templates/demo").iterdir()) == ["12-20261115"]
    assert tmplbuild("repo", "verify", str(repo)).returncode == 0
    before = index_of(repo)
    time.sleep(1.1)
    proc = tmplbuild("repo", "resign", str(repo), "--key", fpr, "--gnupghome", str(home), "--expires-in", "60d")
    assert proc.returncode == 0, proc.stderr
    after = index_of(repo)
    assert after["version"] == before["version"] + 1 and after["templates"] == before["templates"]
    assert after["expires"] > before["expires"]
    assert tmplbuild("repo", "verify", str(repo)).returncode == 0


@pytest.mark.skipif(not Path("/lib/systemd/systemd-pull").exists() or os.geteuid() != 0,
                    reason="needs systemd-container and root")
def test_systemd_pull_imports_a_published_tar_xz_and_refuses_a_tampered_one(tmp_path, repo, key):
    """Two architectures of one version share its directory and its SHA256SUMS: systemd-pull takes either."""
    home, fpr = key
    assert publish(repo, key, make_artifact(tmp_path / "out", formats=(Compression.XZ,)),
                   make_artifact(tmp_path / "out-arm64", arch="arm64", formats=(Compression.XZ,),
                                 payload="arm64\n")).returncode == 0
    pubring = tmp_path / "pubring.gpg"
    pubring.write_bytes(gpg(home, "--export", fpr).stdout)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port),
                               "--directory", str(repo)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(50):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        url = f"http://127.0.0.1:{port}/templates/demo/12-20261120/demo_12-20261120_amd64.tar.xz"

        def pull(name: str, url: str = url) -> subprocess.CompletedProcess[str]:
            # Our key becomes systemd's import keyring only inside a private mount namespace: the machine's own
            # /usr/lib/systemd/import-pubring.gpg is never touched.
            script = (f"mount --bind {pubring} /usr/lib/systemd/import-pubring.gpg && "
                      f"exec /lib/systemd/systemd-pull tar --verify=signature --settings=no "
                      f"--image-root={tmp_path / 'machines'} {url} {name}")
            return subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                                  capture_output=True, text=True, timeout=120)

        (tmp_path / "machines").mkdir()
        ok = pull("demo")
        assert ok.returncode == 0, ok.stderr
        assert (tmp_path / "machines/demo/etc/motd").read_text() == "hello\n"
        arm = pull("demo-arm64", url.replace("_amd64.", "_arm64."))
        assert arm.returncode == 0, arm.stderr
        assert (tmp_path / "machines/demo-arm64/etc/motd").read_text() == "arm64\n"
        tarball = repo / "templates/demo/12-20261120/demo_12-20261120_amd64.tar.xz"
        data = bytearray(tarball.read_bytes())
        data[-20] ^= 1
        tarball.write_bytes(bytes(data))
        bad = pull("tampered")
        assert bad.returncode != 0
        assert not (tmp_path / "machines/tampered").exists()
    finally:
        server.terminate()
        server.wait()
        # systemd-pull marks the images it keeps immutable (chattr +i): without this, pytest can delete none of
        # tmp_path, and each run of the suite used to leave gigabytes behind until the disk was full.
        for image in (tmp_path / "machines").glob("*") if (tmp_path / "machines").exists() else ():
            subprocess.run(["chattr", "-i", str(image)], capture_output=True)
        shutil.rmtree(tmp_path / "machines", ignore_errors=True)
        assert not (tmp_path / "machines").exists()


def test_one_publish_of_two_templates_keeps_each_directory_sums_to_its_own_files(tmp_path, repo, key):
    a = make_artifact(tmp_path / "a", name="alpha")
    b = make_artifact(tmp_path / "b", name="beta")
    c = make_artifact(tmp_path / "c", name="alpha", arch="arm64", payload="arm\n")
    assert publish(repo, key, a, b, c).returncode == 0
    alpha = (repo / "templates/alpha/12-20261120/SHA256SUMS").read_text()
    assert "beta" not in alpha and "alpha_12-20261120_amd64.tar.zst" in alpha and "alpha_12-20261120_arm64" in alpha
    assert "alpha" not in (repo / "templates/beta/12-20261120/SHA256SUMS").read_text()
    assert tmplbuild("repo", "verify", str(repo)).returncode == 0
