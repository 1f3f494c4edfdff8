"""Signed deltas between template versions (tmplbuild.repo.deltas, tmplbuild.client.delta): what the publisher
writes and signs, and what a node does with them over real HTTP: the file a delta rebuilds is the signed file
byte for byte, and any delta that does not give it (tampered, truncated, for another base, another compressor)
costs a one-line warning and the full download, never a half-written or unverified file."""
from __future__ import annotations

import hashlib
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, previous_tmplbuild
from tests.test_client import client_env
from tests.test_repo import make_artifact, publish
from tests.test_server import Server, init_repo, kill_agents, make_key
from tmplbuild.repo import index as idx

NAME = "demo"
V1, V2, V3 = "12-20261120", "12-20261127", "12-20261204"


def blob(seed: int, size: int = 3 << 20) -> bytes:
    return random.Random(seed).randbytes(size)


def version_artifact(out: Path, version: str, changed: int) -> Path:
    """A template whose bulk (/usr/lib/blob, 3 MiB that compress poorly, as binaries do) is the same from one
    version to the next but for `changed` bytes in its middle, and whose /etc/motd names its version."""
    data = bytearray(blob(1))
    data[1 << 20: (1 << 20) + changed] = blob(changed, changed)
    return make_artifact(out / version, version=version, payload=f"{version}\n", blob=bytes(data),
                         created=f"2026-{version[7:9]}-{version[9:11]}T00:00:00Z")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A repository server with V1, V2 and V3 of `demo` published one after the other (deltas: V2 from V1, V3
    from V2 and V1)."""
    base = tmp_path_factory.mktemp("delta")
    key = make_key(base)
    repo = init_repo(base / "repo", key)
    arts = {v: version_artifact(base / "out", v, 4096 * (i + 1)) for i, v in enumerate((V1, V2, V3))}
    for v in (V1, V2, V3):
        proc = publish(repo, key, arts[v])
        assert proc.returncode == 0, proc.stderr
    pub = base / "pub.asc"
    pub.write_bytes(subprocess.run(["gpg", "--homedir", str(key[0]), "--armor", "--export", key[1]],
                                   capture_output=True, check=True).stdout)
    server = Server(repo, base / "logs", workers=1)
    yield base, repo, server, key, pub, arts
    server.stop()
    kill_agents(key[0])


def entry(repo: Path, version: str) -> dict:
    return next(e for e in json.loads((repo / "index.json").read_bytes())["templates"] if e["version"] == version)


def zst_of(art: Path) -> Path:
    return art.with_name(art.name.replace(".manifest.json", ".tar.zst"))


class Node:
    """A node with its own config, state and template cache, fetching from the world's server."""

    def __init__(self, tmp: Path, world) -> None:
        base, repo, server, key, pub, arts = world
        self.tmp, self.server, self.key, self.pub = tmp, server, key, pub
        self.dest = tmp / "cache"
        self.env = client_env(tmp, tmp / "config", tmp / "state")

    def pins(self) -> list[str]:
        return ["--url", self.server.url(""), "--key", str(self.pub), "--fingerprint", self.key[1]]

    def fetch(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "tmplbuild", "fetch", NAME, "--arch", "amd64", "--dest",
                               str(self.dest), *args, *self.pins()], cwd=ROOT, capture_output=True, text=True,
                              env=self.env, timeout=300)

    def files(self) -> list[str]:
        return sorted(p.name for p in self.dest.iterdir())


def tamper(path: Path, how):
    """Change a served file for the length of a with-block."""
    class Ctx:
        def __enter__(self):
            self.saved = path.read_bytes()
            path.write_bytes(how(self.saved))

        def __exit__(self, *exc):
            path.write_bytes(self.saved)
    return Ctx()


# -- the publisher ------------------------------------------------------------------------------------------------

def test_each_version_gets_signed_deltas_from_the_last_two_listed_after_its_files(world):
    base, repo, server, key, pub, arts = world
    assert [f["format"] for f in entry(repo, V1)["files"]] == ["tar.zst"]  # nothing earlier: no delta
    e2, e3 = entry(repo, V2), entry(repo, V3)
    assert [f["format"] for f in e2["files"]] == ["tar.zst", idx.DELTA_FORMAT]
    deltas = [f for f in e3["files"] if f["format"] == idx.DELTA_FORMAT]
    assert [d["delta"]["base_version"] for d in deltas] == [V2, V1]  # newest base first
    d3 = deltas[0]
    base_ref = entry(repo, V2)["files"][0]
    assert d3["delta"]["base_sha256"] == base_ref["sha256"] and d3["delta"]["base_size"] == base_ref["size"]
    assert d3["path"] == f"templates/{NAME}/{V3}/{NAME}_{V3}_amd64.from-{V2}.tar.zst.delta"
    assert d3["size"] < e3["files"][0]["size"] / 10  # 3 MiB of bulk, 12 KiB of it changed
    data = (repo / d3["path"]).read_bytes()
    assert hashlib.sha256(data).hexdigest() == d3["sha256"] and hashlib.sha512(data).hexdigest() == d3["sha512"]
    # Covered by the directory's SHA256SUMS and its own detached signature, as every file of a version.
    sums = (repo / f"templates/{NAME}/{V3}/SHA256SUMS").read_text()
    assert f"{d3['sha256']}  {Path(d3['path']).name}\n" in sums
    gpgv = subprocess.run(["gpg", "--homedir", str(key[0]), "--verify", str(repo / (d3["path"] + ".asc")),
                           str(repo / d3["path"])], capture_output=True)
    assert gpgv.returncode == 0, gpgv.stderr
    audit = subprocess.run([sys.executable, "-m", "tmplbuild", "repo", "verify", str(repo)], cwd=ROOT,
                           capture_output=True, text=True)
    assert audit.returncode == 0, audit.stdout + audit.stderr


def test_republishing_a_version_with_deltas_is_still_a_no_op(world):
    base, repo, server, key, pub, arts = world
    before = (repo / "index.json").read_bytes()
    proc = publish(repo, key, arts[V3])
    assert proc.returncode == 0, proc.stderr
    assert "nothing new to publish" in proc.stdout and (repo / "index.json").read_bytes() == before


def test_deltas_0_publishes_none_and_the_page_labels_deltas(tmp_path, world):
    key = make_key(tmp_path)
    repo = init_repo(tmp_path / "repo", key)
    for v in (V1, V2):
        art = version_artifact(tmp_path / "out", v, 100)
        home, fpr = key
        proc = subprocess.run([sys.executable, "-m", "tmplbuild", "publish", "--skip-test", "--deltas", "0",
                               str(art), "--repo", str(repo), "--key", fpr, "--gnupghome", str(home)],
                              cwd=ROOT, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
    assert [f["format"] for f in entry(repo, V2)["files"]] == ["tar.zst"]
    kill_agents(key[0])
    import requests

    page = requests.get(world[2].url("/"), timeout=30).text
    assert f"delta from {V2}: <a href=" in page and f"delta from {V1}: <a href=" in page


# -- the node ---------------------------------------------------------------------------------------------------

def test_a_node_holding_the_previous_version_downloads_only_the_delta_and_gets_the_signed_file(tmp_path, world):
    base, repo, server, key, pub, arts = world
    node = Node(tmp_path, world)
    first = node.fetch("--version", V2)
    assert first.returncode == 0, first.stderr
    e3 = entry(repo, V3)
    delta = next(f for f in e3["files"] if f["format"] == idx.DELTA_FORMAT and f["delta"]["base_version"] == V2)
    # The full file is not what the node downloads: served broken meanwhile, it is never noticed.
    with tamper(repo / e3["path"], lambda b: bytes(len(b))):
        got = node.fetch("--json")
    assert got.returncode == 0, got.stderr
    out = json.loads(got.stdout)
    assert out["status"] == "fetched" and out["version"] == V3
    assert out["delta"] == {"base_version": V2, "base_file": str(node.dest / f"{NAME}_{V2}_amd64.tar.zst"),
                            "path": delta["path"], "size": delta["size"], "saved": e3["size"] - delta["size"]}
    target = node.dest / f"{NAME}_{V3}_amd64.tar.zst"
    assert target.read_bytes() == zst_of(arts[V3]).read_bytes()  # the built file, byte for byte
    assert node.files() == [f"{NAME}_{V2}_amd64.tar.zst", f"{NAME}_{V3}_amd64.tar.zst"]  # no hidden leftovers
    # Said in words too, with the bytes saved.
    (node.dest / target.name).unlink()
    words = node.fetch()
    assert words.returncode == 0, words.stderr
    assert f"rebuilt from {NAME}_{V2}_amd64.tar.zst and a {delta['size']}-byte delta, and verified" in words.stdout
    assert f"{e3['size'] - delta['size']} bytes saved" in words.stdout


def test_a_node_two_versions_behind_uses_the_delta_from_its_own_version(tmp_path, world):
    base, repo, server, key, pub, arts = world
    node = Node(tmp_path, world)
    assert node.fetch("--version", V1).returncode == 0
    out = json.loads(node.fetch("--json").stdout)
    assert out["delta"]["base_version"] == V1
    assert (node.dest / f"{NAME}_{V3}_amd64.tar.zst").read_bytes() == zst_of(arts[V3]).read_bytes()


def test_no_delta_and_no_base_download_the_whole_file_without_a_word_about_deltas(tmp_path, world):
    base, repo, server, key, pub, arts = world
    node = Node(tmp_path, world)
    assert node.fetch("--version", V2).returncode == 0
    whole = node.fetch("--json", "--no-delta")
    assert whole.returncode == 0 and json.loads(whole.stdout)["delta"] is None
    assert "delta" not in whole.stderr
    fresh = Node(tmp_path / "fresh", world)
    first = fresh.fetch("--json")
    assert first.returncode == 0 and json.loads(first.stdout)["delta"] is None and "delta" not in first.stderr


@pytest.mark.parametrize("how, reason", [
    (lambda b: b[:100] + bytes([b[100] ^ 1]) + b[101:], "sha256"),  # hostile: one bit
    (lambda b: b[: len(b) // 2], "size"),  # truncated: the server announces half
    (lambda b: blob(7, len(b)), "sha256"),  # another delta altogether (another base's), same length
])
def test_a_delta_that_does_not_verify_is_refused_in_one_line_and_the_whole_file_fetched(tmp_path, world, how,
                                                                                          reason):
    base, repo, server, key, pub, arts = world
    node = Node(tmp_path, world)
    assert node.fetch("--version", V2).returncode == 0
    delta = repo / next(f["path"] for f in entry(repo, V3)["files"] if f["format"] == idx.DELTA_FORMAT)
    with tamper(delta, how):
        got = node.fetch("--json")
    assert got.returncode == 0, got.stderr
    warnings = [ln for ln in got.stderr.splitlines() if "delta" in ln]
    assert len(warnings) == 1 and reason in warnings[0] and "downloading the whole file" in warnings[0], got.stderr
    assert json.loads(got.stdout)["delta"] is None
    assert (node.dest / f"{NAME}_{V3}_amd64.tar.zst").read_bytes() == zst_of(arts[V3]).read_bytes()
    assert node.files() == [f"{NAME}_{V2}_amd64.tar.zst", f"{NAME}_{V3}_amd64.tar.zst"]


def test_a_corrupt_base_is_not_used_and_not_touched(tmp_path, world):
    base, repo, server, key, pub, arts = world
    node = Node(tmp_path, world)
    assert node.fetch("--version", V2).returncode == 0
    old = node.dest / f"{NAME}_{V2}_amd64.tar.zst"
    data = bytearray(old.read_bytes())
    data[len(data) // 2] ^= 0xFF
    old.write_bytes(bytes(data))
    got = node.fetch("--json")
    assert got.returncode == 0, got.stderr
    assert json.loads(got.stdout)["delta"] is None  # its sha256 is no delta's base: the whole file
    assert old.read_bytes() == bytes(data)
    assert (node.dest / f"{NAME}_{V3}_amd64.tar.zst").read_bytes() == zst_of(arts[V3]).read_bytes()


def _fetch_in_process(node: Node, monkeypatch, capsys) -> tuple[int, str, str]:
    from tmplbuild import cli

    for k, v in node.env.items():
        monkeypatch.setenv(k, v)
    code = cli.main(["fetch", NAME, "--arch", "amd64", "--dest", str(node.dest), "--json", *node.pins()])
    out, err = capsys.readouterr()
    return code, out, err


def test_a_client_whose_compressor_gives_other_bytes_falls_back_to_the_whole_file(tmp_path, world, monkeypatch,
                                                                                capsys):
    import zstandard

    from tmplbuild import zst

    base, repo, server, key, pub, arts = world
    node = Node(tmp_path, world)
    assert node.fetch("--version", V2).returncode == 0

    def other(level=zst.LEVEL, window_log=zst.WINDOW_LOG):  # same version string, other bytes
        return zstandard.ZstdCompressor(level=3)

    monkeypatch.setattr(zst, "compressor", other)
    code, out, err = _fetch_in_process(node, monkeypatch, capsys)
    assert code == 0, err
    lines = [ln for ln in err.splitlines() if "delta" in ln]
    assert len(lines) == 1 and "rebuilt" in lines[0] and "downloading the whole file" in lines[0], err
    assert json.loads(out)["delta"] is None
    assert (node.dest / f"{NAME}_{V3}_amd64.tar.zst").read_bytes() == zst_of(arts[V3]).read_bytes()
    assert node.files() == [f"{NAME}_{V2}_amd64.tar.zst", f"{NAME}_{V3}_amd64.tar.zst"]


def test_a_client_with_another_libzstd_does_not_even_download_the_delta(tmp_path, world, monkeypatch, capsys):
    from tmplbuild import zst

    base, repo, server, key, pub, arts = world
    node = Node(tmp_path, world)
    assert node.fetch("--version", V2).returncode == 0
    monkeypatch.setattr(zst, "version", lambda: "1.4.0")
    code, out, err = _fetch_in_process(node, monkeypatch, capsys)
    assert code == 0, err
    assert f"compressed with libzstd {zst.zstandard.ZSTD_VERSION[0]}." in err and "has 1.4.0" in err, err
    assert json.loads(out)["delta"] is None


def test_a_delta_download_cut_short_is_resumed_by_the_next_fetch(tmp_path, world):
    """The delta's .part kept after a transport failure is resumed: the next fetch asks only for the rest (the
    first half is served broken meanwhile, so a download from byte 0 would not verify)."""
    base, repo, server, key, pub, arts = world
    node = Node(tmp_path, world)
    assert node.fetch("--version", V2).returncode == 0
    ref = next(f for f in entry(repo, V3)["files"] if f["format"] == idx.DELTA_FORMAT)
    # A part as an interrupted download leaves it: the first half of the signed delta.
    data = (repo / ref["path"]).read_bytes()
    part = node.dest / f"..{NAME}_{V3}_amd64.tar.zst.delta.part"  # hidden, as install() names the delta's part
    part.write_bytes(data[: len(data) // 2])
    with tamper(repo / ref["path"], lambda b: bytes(len(b) // 2) + b[len(b) // 2:]):
        got = node.fetch("--json")
    assert got.returncode == 0, got.stderr
    used = json.loads(got.stdout)["delta"]
    assert used is not None and used["base_version"] == V2, got.stderr + got.stdout + str(node.files())
    assert node.files() == [f"{NAME}_{V2}_amd64.tar.zst", f"{NAME}_{V3}_amd64.tar.zst"]


# -- older tmplbuilds ---------------------------------------------------------------------------------------------

PREVIOUS = "8703e2c"  # main before deltas


@pytest.fixture(scope="module")
def previous(tmp_path_factory):
    return previous_tmplbuild(tmp_path_factory, PREVIOUS)


def test_the_previous_tmplbuild_lists_fetches_verifies_and_audits_a_repository_with_deltas(tmp_path, world,
                                                                                           previous):
    base, repo, server, key, pub, arts = world
    node = Node(tmp_path, world)
    env = {**node.env, "PYTHONPATH": str(previous)}

    def old(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "tmplbuild", *args], cwd=previous, capture_output=True,
                              text=True, env=env, timeout=120)

    assert "--no-delta" not in old("fetch", "--help").stdout  # it is the previous one
    listed = old("list", "--json", *node.pins())
    assert listed.returncode == 0, listed.stderr
    assert {e["version"] for e in json.loads(listed.stdout)["templates"]} == {V1, V2, V3}
    for v in (V2, V3):
        got = old("fetch", NAME, "--version", v, "--arch", "amd64", "--dest", str(node.dest), *node.pins())
        assert got.returncode == 0, got.stderr
    assert (node.dest / f"{NAME}_{V3}_amd64.tar.zst").read_bytes() == zst_of(arts[V3]).read_bytes()
    checked = old("verify", str(node.dest / f"{NAME}_{V3}_amd64.tar.zst"), *node.pins())
    assert checked.returncode == 0, checked.stderr
    audit = old("repo", "verify", str(repo))
    assert audit.returncode == 0, audit.stdout + audit.stderr


def test_the_help_states_the_default_number_of_deltas():
    from tmplbuild.repo.deltas import DEFAULT_COUNT

    for verb in ("publish", "rebuild"):
        out = subprocess.run([sys.executable, "-m", "tmplbuild", verb, "--help"], cwd=ROOT, capture_output=True,
                             text=True).stdout
        assert f"(default {DEFAULT_COUNT}; 0: none)" in " ".join(out.split()), verb
