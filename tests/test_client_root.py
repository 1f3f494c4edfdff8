"""The node admin's client with a pinned root of trust (`remote add --root-key`, `--root`, `--url --root-key`):
TUF's root role with real gpg throwaway keys, a repository served on 127.0.0.1, and the real CLI run with its
state and configuration in temporary directories.

The repository is the one tests/test_client.py builds (two published versions of `demo`), copied, its index
re-signed by an online key and given a chain of roots (tmplbuild.repo.chain.install for good roots, written
directly for the bad ones a mirror might serve). Every refusal asserts the exit code, the one line naming the
check, and that the client state and the destination are byte-identical afterwards.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.test_client import (NEW, Server, base, client_env, node_snapshot, one_line,  # noqa: F401 - base: a fixture
                               run_client, tarball_path)
from tests.conftest import Keys
from tmplbuild.errors import LocalIOError
from tmplbuild.repo import chain as repochain
from tmplbuild.repo import index as idx
from tmplbuild.repo import root as rootdoc

ABC = ("root-a", "root-b", "root-c")
BCD = ("root-b", "root-c", "root-d")


@dataclass
class Repo:
    """A repository directory served on 127.0.0.1, signed with the throwaway keys."""

    path: Path
    keys: Keys
    server: Server

    @property
    def url(self) -> str:
        return self.server.url

    def index(self) -> idx.Index:
        return idx.parse((self.path / "index.json").read_bytes())

    def publish_index(self, index: idx.Index, *signers: str) -> bytes:
        """Write `index` as the repository's index.json, signed by `signers` (concatenated armored blocks)."""
        data = index.to_bytes()
        (self.path / "index.json.asc").write_bytes(self.keys.sign(data, *signers))
        (self.path / "index.json").write_bytes(data)
        return data

    def next_index(self, version: int | None = None) -> idx.Index:
        cur = self.index()
        nxt = cur.successor(cur.templates, 7 * 86400)
        return nxt if version is None else dataclasses.replace(nxt, version=version)

    def root(self, version: int, root: tuple[str, ...] = ABC, online: tuple[str, ...] = ("online-1",),
             threshold: int = 2, **kw) -> bytes:
        return self.keys.root(version, root, online, threshold=threshold, **kw)

    def install(self, data: bytes, *signers: str) -> rootdoc.Root:
        """A good root, through the repository's own check (tmplbuild.repo.chain.install)."""
        return repochain.install(self.path, data, self.keys.sign(data, *signers))[0]

    def put_root(self, version: int, data: bytes, *signers: str) -> None:
        """Any root file, as a mirror might serve it (no check)."""
        (self.path / "root").mkdir(exist_ok=True)
        (self.path / rootdoc.path(version)).write_bytes(data)
        (self.path / (rootdoc.path(version) + ".asc")).write_bytes(self.keys.sign(data, *signers))

    def drop_root(self, version: int) -> None:
        for suffix in ("", ".asc"):
            (self.path / (rootdoc.path(version) + suffix)).unlink()


@dataclass
class Client:
    """One node: its own state, config and template cache, running the real CLI."""

    tmp: Path
    repo: Repo

    @property
    def state(self) -> Path:
        return self.tmp / "state"

    @property
    def config(self) -> Path:
        return self.tmp / "config"

    @property
    def dest(self) -> Path:
        return self.tmp / "cache"

    def env(self) -> dict[str, str]:
        return client_env(self.tmp, self.config, self.state)

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return run_client(self.env(), *args)

    def add(self, *pins: str, name: str = "main") -> subprocess.CompletedProcess[str]:
        return self.run("remote", "add", name, self.repo.url, *pins)

    def add_pinned(self, *names: str) -> None:
        pins = [a for n in names for a in ("--root-key", self.repo.keys[n])]
        proc = self.add(*pins)
        assert proc.returncode == 0, proc.stderr

    def fetch(self, *extra: str) -> subprocess.CompletedProcess[str]:
        self.dest.mkdir(exist_ok=True)
        return self.run("fetch", "demo", "--arch", "amd64", "--dest", str(self.dest), *extra)

    def list(self, *extra: str) -> subprocess.CompletedProcess[str]:
        return self.run("list", *extra)

    def root_file(self) -> Path:
        """The trusted root, kept under the repository's identity (its pinned root keys), not the remote's name."""
        (found,) = self.state.glob("id-*.root.json")
        return found

    def stored_root(self) -> bytes:
        return self.root_file().read_bytes()

    def state_doc(self) -> dict:
        (found,) = [p for p in self.state.glob("id-*.json") if not p.name.endswith(".root.json")]
        return json.loads(found.read_text())

    def snapshot(self) -> dict[str, bytes]:
        return node_snapshot(self.dest, self.state)


@pytest.fixture
def repo(tmp_path, base, keys):
    """The client tests' repository, its index re-signed by online-1, with root 1: root keys a, b, c (2 of 3),
    online key online-1. Served until the test ends."""
    path = tmp_path / "repo"
    shutil.copytree(base.root, path, ignore=shutil.ignore_patterns(".lock"))
    server = Server(path)
    r = Repo(path, keys, server)
    r.publish_index(r.index(), "online-1")
    r.install(r.root(1), "root-a", "root-b")
    try:
        yield r
    finally:
        server.stop()


@pytest.fixture
def client(tmp_path, repo):
    return Client(tmp_path / "node", repo)


def another(client: Client, name: str) -> Client:
    return Client(client.tmp.parent / name, client.repo)


def trusting_root_1(client: Client) -> dict[str, bytes]:
    """A remote pinned to root keys a and b that fetched once (trusts root 1, index version 3); the snapshot."""
    client.add_pinned("root-a", "root-b")
    proc = client.fetch()
    assert proc.returncode == 0, proc.stderr
    assert rootdoc.parse(client.stored_root()).version == 1
    return client.snapshot()


# -- pinning and following the root -------------------------------------------------------------------------------

def test_a_client_pinned_to_two_of_three_root_keys_fetches_and_stores_the_root(client):
    repo = client.repo
    client.add_pinned("root-a", "root-b")
    conf = (client.config / "remotes.toml").read_text()
    assert f'root_keys = ["{repo.keys["root-a"]}", "{repo.keys["root-b"]}"]' in conf and "key =" not in conf
    proc = client.fetch()
    assert proc.returncode == 0, proc.stderr
    name = f"demo_{NEW}_amd64.tar.zst"
    assert (client.dest / name).read_bytes() == (repo.path / tarball_path(NEW)).read_bytes()
    assert client.stored_root() == (repo.path / "root/1.root.json").read_bytes()
    doc = client.state_doc()
    assert (doc["repo_id"], doc["version"], doc["online"]) == ("test-repo", 3, [repo.keys["online-1"]])
    # The next run starts from the stored root: it asks for root 2 (404) and nothing else of root/.
    again = client.fetch()
    assert again.returncode == 0 and "already present and verified" in again.stdout, again.stderr
    assert len(repo.server.gets("root/1.root.json")) == 1
    assert len(repo.server.gets("root/2.root.json")) == 2
    listed = client.run("remote", "list")
    assert listed.returncode == 0, listed.stderr
    row = listed.stdout.splitlines()[1]
    assert f"root:{repo.keys['root-a']}" in row and "1, expires" in row
    # One-off use pins the same way, with its own state.
    oneoff = client.run("list", "--json", "--url", repo.url, "--root-key", repo.keys["root-b"], "--root-key",
                        repo.keys["root-a"])
    assert oneoff.returncode == 0, oneoff.stderr
    assert json.loads(oneoff.stdout)["signer"] == repo.keys["online-1"]


def test_one_pinned_root_key_of_a_two_of_three_root_anchors_nothing(client):
    client.add_pinned("root-a")
    before = client.snapshot()
    proc = client.fetch()
    assert proc.returncode == 3 and "pinned root keys" in one_line(proc, "root pin")
    assert client.snapshot() == before and not list(client.dest.iterdir())


def test_a_mistyped_root_fingerprint_is_refused_without_offering_the_servers_keys_as_expected(client):
    """The root keys a server's root names are its claim: the error labels them so, and sends the user back to
    the fingerprints given out of band, instead of printing them as what was "expected" (to be pasted)."""
    typo = client.repo.keys["root-a"][:-1] + ("0" if client.repo.keys["root-a"][-1] != "0" else "1")
    client.add("--root-key", typo, "--root-key", client.repo.keys["root-b"])
    line = one_line(client.fetch(), "root pin")
    assert "check the fingerprints you pinned against the ones the maintainers gave you out of band" in line
    claim = line.index("the server claims root keys")
    assert "expected 2 of" not in line and "expected 2;" in line
    for name in ("root-a", "root-c"):
        assert line.index(client.repo.keys[name]) > claim, name


def test_a_url_with_no_repository_says_so_not_that_its_roots_are_missing(client):
    """A wrong path (the repository is at /, the admin typed /repo) is exit 5 naming index.json's 404, for a
    root-pinned and a key-pinned client alike, and leaves no state; a real repository without roots is still a
    root pin failure (exit 3)."""
    wrong = f"{client.repo.url}/repo"
    for pins in (("--root-key", client.repo.keys["root-a"], "--root-key", client.repo.keys["root-b"]),
                 ("--fingerprint", client.repo.keys["online-1"], "--key", str(client.repo.path / "keys" / f"{client.repo.keys['online-1']}.asc"))):
        proc = client.run("list", "--url", wrong, *pins)
        assert proc.returncode == 5, proc.stderr
        assert one_line(proc, "repository") == (f"tmplbuild: repository: no tmplbuild repository at {wrong} "
                                                "(index.json: 404); check the URL")
    assert not client.state.exists() or not list(client.state.iterdir())
    client.repo.drop_root(1)
    proc = client.run("list", "--url", client.repo.url, "--root-key", client.repo.keys["root-a"],
                      "--root-key", client.repo.keys["root-b"])
    assert proc.returncode == 3 and "publishes no root of trust" in one_line(proc, "root pin")


def test_a_client_offline_across_two_rotations_catches_up(client):
    repo = client.repo
    trusting_root_1(client)
    repo.install(repo.root(2, online=("online-2",)), "root-a", "root-b")
    # root-a rotated out for root-d: two of the old root keys and two of the new
    three = repo.install(repo.root(3, root=BCD, online=("online-2",)), "root-a", "root-b", "root-d")
    repo.publish_index(repo.next_index(), "online-2")
    (client.dest / f"demo_{NEW}_amd64.tar.zst").unlink()
    proc = client.fetch()
    assert proc.returncode == 0, proc.stderr
    assert client.stored_root() == three.raw
    doc = client.state_doc()
    assert (doc["version"], doc["online"]) == (4, [repo.keys["online-2"]])
    # a brand-new client pinned to the original root keys walks the whole chain too
    fresh = another(client, "fresh")
    fresh.add_pinned("root-b", "root-a")
    assert fresh.fetch().returncode == 0
    assert fresh.stored_root() == three.raw


def test_an_index_signed_by_an_online_key_a_rotation_dropped_is_refused(client):
    repo = client.repo
    trusting_root_1(client)
    repo.install(repo.root(2, online=("online-2",)), "root-a", "root-b")
    nxt = repo.next_index()
    repo.publish_index(nxt, "online-2")
    assert client.list().returncode == 0
    assert rootdoc.parse(client.stored_root()).version == 2
    before = client.snapshot()
    # a mirror (or whoever holds online-1) serves an index signed by the dropped key
    data = nxt.to_bytes()
    repo.server.override = {"index.json": data, "index.json.asc": repo.keys.sign(data, "online-1")}
    proc = client.fetch()
    assert proc.returncode == 3 and "not pinned" in one_line(proc, "signature")
    assert client.snapshot() == before
    fresh = another(client, "fresh")
    fresh.add_pinned("root-b", "root-a")
    proc = fresh.fetch()
    assert proc.returncode == 3
    one_line(proc, "signature")
    # the new client keeps root 2, which the chain proved (TUF 5.3.8), and records no index
    assert [p.name for p in fresh.state.glob("*.json")] == [fresh.root_file().name]
    assert rootdoc.parse(fresh.stored_root()).version == 2
    assert not list(fresh.dest.iterdir())
    # a mirror that now hides root 2 cannot bring the dropped key back for either client
    repo.drop_root(2)
    for node in (client, fresh):
        proc = node.fetch()
        assert proc.returncode == 3 and "not pinned" in one_line(proc, "signature")
    assert not list(fresh.dest.iterdir())


def test_trust_belongs_to_the_repository_not_to_the_url_typed(client, tmp_path):
    """A client learns a rotation (root 2 drops online-1) through its remote's URL. Another URL, a one-off --url
    with the same pinned root keys, serves the state from before the rotation (root 1 only, an index online-1
    signed): refused, since what the client remembers is the repository's, whatever URL reaches it."""
    repo = client.repo
    old = tmp_path / "before-rotation"
    trusting_root_1(client)
    shutil.copytree(repo.path, old, ignore=shutil.ignore_patterns(".lock"))
    repo.install(repo.root(2, online=("online-2",)), "root-a", "root-b")
    repo.publish_index(repo.next_index(), "online-2")
    assert client.list().returncode == 0
    stale = Server(old)
    try:
        before = client.snapshot()
        pins = ["--root-key", repo.keys["root-a"], "--root-key", repo.keys["root-b"]]
        proc = client.run("list", "--url", stale.url, *pins)
        assert proc.returncode == 3, proc.stdout + proc.stderr
        assert "not pinned" in one_line(proc, "signature")
        assert client.snapshot() == before
        # The same URL with the pins in another order and spelling is the same repository.
        proc = client.run("list", "--url", stale.url, "--root-key", repo.keys["root-b"].lower(),
                          "--root-key", repo.keys["root-a"])
        assert proc.returncode == 3
        # A state from before identity keys (the remote's own files) is read, not forgotten.
        for f in client.state.glob("id-*"):
            f.rename(client.state / f.name.replace(f.name.split(".")[0], "remote-main"))
        repo.server.override = {"index.json": (old / "index.json").read_bytes(),
                                "index.json.asc": (old / "index.json.asc").read_bytes()}
        proc = client.fetch()
        assert proc.returncode == 3 and "not pinned" in one_line(proc, "signature")
    finally:
        stale.stop()


def test_the_index_must_carry_the_repo_id_of_the_root_even_on_first_use(client):
    repo = client.repo
    client.add_pinned("root-a", "root-b")
    other = dataclasses.replace(repo.next_index(), repo_id="other-repo").to_bytes()
    repo.server.override = {"index.json": other, "index.json.asc": repo.keys.sign(other, "online-1")}
    proc = client.fetch()
    assert proc.returncode == 3 and "found 'other-repo', expected 'test-repo'" in one_line(proc, "repo id")
    assert [rootdoc.parse(v).version for v in client.snapshot().values()] == [1]  # the anchor only, no index


# -- roots a client must refuse ------------------------------------------------------------------------------------

def _expired_root_2(repo: Repo) -> tuple[bytes, tuple[str, ...]]:
    return repo.root(2, now=time.time() - 10 * 86400), ("root-a", "root-b")


@pytest.mark.parametrize("case, code, check", [
    ("below threshold", 3, "root signature"),
    ("only new keys", 3, "root signature"),
    ("rollback", 4, "root rollback"),
    ("expired", 4, "root expired"),
])
def test_a_bad_next_root_is_refused_and_changes_nothing(client, case, code, check):
    repo = client.repo
    before = trusting_root_1(client)
    if case == "below threshold":
        repo.put_root(2, repo.root(2, online=("online-2",)), "root-a")
    elif case == "only new keys":
        repo.put_root(2, repo.root(2, root=("root-d", "thief"), online=("thief",), threshold=1), "root-d", "thief")
    elif case == "rollback":  # root 1, validly signed, served as root 2
        repo.put_root(2, (repo.path / "root/1.root.json").read_bytes(), "root-a", "root-b")
    else:
        data, signers = _expired_root_2(repo)
        repo.put_root(2, data, *signers)
    proc = client.fetch()
    assert proc.returncode == code, proc.stderr
    line = one_line(proc, check)
    if case == "below threshold":
        assert "1 good signature(s) by the root keys of root 1" in line and "expected 2 of" in line
    if case == "only new keys":
        assert "by the root keys of root 1" in line
    root_file = str(client.root_file())
    if case == "expired":
        # A good but expired root is kept, as TUF 5.3.8 persists a root once the chain proved it (a mirror
        # hiding it later must not bring root 1's keys back); nothing else changes.
        after = client.snapshot()
        assert rootdoc.parse(after.pop(root_file)).version == 2
        assert after == {k: v for k, v in before.items() if k != root_file}
    else:
        assert client.snapshot() == before
    # a brand-new client refuses the same root on its walk from the anchor, and records no index
    fresh = another(client, "fresh")
    fresh.add_pinned("root-a", "root-b")
    proc = fresh.fetch()
    assert proc.returncode == code, proc.stderr
    one_line(proc, check)
    kept = [rootdoc.parse(v).version for v in fresh.snapshot().values()]
    assert kept == ([2] if case == "expired" else [])  # the proved expired root 2; nothing when the walk failed


def test_an_expired_newest_root_is_refused_until_a_fresh_one_follows(client):
    repo = client.repo
    before = trusting_root_1(client)
    data, signers = _expired_root_2(repo)
    repo.put_root(2, data, *signers)
    proc = client.list()
    assert proc.returncode == 4 and "root 2 of test-repo expired at" in one_line(proc, "root expired")
    assert {k: v for k, v in client.snapshot().items() if not k.endswith(".root.json")} == \
        {k: v for k, v in before.items() if not k.endswith(".root.json")}
    # An expired intermediate root is walked: root 3 signed by root 2's keys makes the chain fresh again.
    repo.put_root(3, repo.root(3), "root-a", "root-b")
    proc = client.list()
    assert proc.returncode == 0, proc.stderr
    assert rootdoc.parse(client.stored_root()).version == 3


def test_a_root_without_its_signatures_is_a_transport_failure(client):
    repo = client.repo
    before = trusting_root_1(client)
    repo.put_root(2, repo.root(2), "root-a", "root-b")
    (repo.path / "root/2.root.json.asc").unlink()
    proc = client.fetch()
    assert proc.returncode == 5 and "HTTP 404" in one_line(proc, "http")
    assert client.snapshot() == before


def test_a_mirror_failing_its_roots_is_skipped_for_one_that_does_not(client):
    repo = client.repo
    good = repo.server
    bad = Server(repo.path)
    try:
        one = (repo.path / "root/1.root.json").read_bytes()
        bad.override = {"root/2.root.json": one, "root/2.root.json.asc": repo.keys.sign(one, "root-a", "root-b")}
        proc = client.run("remote", "add", "main", bad.url, good.url, "--root-key", repo.keys["root-a"],
                          "--root-key", repo.keys["root-b"])
        assert proc.returncode == 0, proc.stderr
        proc = client.fetch()
        assert proc.returncode == 0 and "root rollback" in proc.stderr, proc.stderr
        assert good.gets("root/2.root.json") and not bad.gets(tarball_path(NEW))
    finally:
        bad.stop()


# -- recovery from a stolen online key ------------------------------------------------------------------------------

def test_a_stolen_online_key_is_recovered_by_a_root_that_replaces_it(client):
    repo = client.repo
    trusting_root_1(client)
    legit = repo.index()
    # The thief signs an index with a huge version with the stolen online-1: before the rotation, it is accepted.
    stolen = repo.next_index(1_000_000)
    stolen_data = stolen.to_bytes()
    stolen_pair = {"index.json": stolen_data, "index.json.asc": repo.keys.sign(stolen_data, "online-1")}
    repo.server.override = dict(stolen_pair)
    proc = client.list()
    assert proc.returncode == 0, proc.stderr
    assert client.state_doc()["version"] == 1_000_000
    # The legitimate maintainers can no longer publish anything the client accepts under root 1 ...
    repo.server.override = {}
    repo.publish_index(repo.next_index(legit.version + 1), "online-1")
    proc = client.list()
    assert proc.returncode == 4 and "expected at least 1000000" in one_line(proc, "rollback")
    # ... until the root key holders sign root 2, which replaces online-1 by online-2.
    repo.install(repo.root(2, online=("online-2",)), "root-a", "root-b")
    repo.publish_index(repo.next_index(legit.version + 2), "online-2")
    proc = client.fetch()
    assert proc.returncode == 0, proc.stderr
    doc = client.state_doc()
    assert (doc["version"], doc["online"]) == (legit.version + 2, [repo.keys["online-2"]])
    assert rootdoc.parse(client.stored_root()).version == 2
    # The thief's index is refused now (its key is no longer an online key), and the bar holds again.
    before = client.snapshot()
    repo.server.override = dict(stolen_pair)
    proc = client.list()
    assert proc.returncode == 3 and "not pinned" in one_line(proc, "signature")
    lower = repo.next_index(legit.version + 1).to_bytes()
    repo.server.override = {"index.json": lower, "index.json.asc": repo.keys.sign(lower, "online-2")}
    proc = client.list()
    assert proc.returncode == 4 and f"expected at least {legit.version + 2}" in one_line(proc, "rollback")
    assert client.snapshot() == before


def test_a_rotation_of_root_keys_only_keeps_the_index_version_bar(client):
    repo = client.repo
    trusting_root_1(client)
    repo.install(repo.root(2, root=BCD), "root-a", "root-b", "root-d")  # the same online key
    old = repo.index().to_bytes()
    repo.publish_index(repo.next_index(), "online-1")
    assert client.list().returncode == 0 and client.state_doc()["version"] == 4
    before = client.snapshot()
    repo.server.override = {"index.json": old, "index.json.asc": repo.keys.sign(old, "online-1")}
    proc = client.list()
    assert proc.returncode == 4 and "index version 3, expected at least 4" in one_line(proc, "rollback")
    assert client.snapshot() == before


# -- configuration -------------------------------------------------------------------------------------------------

def test_remote_add_with_an_out_of_band_root_document_then_fetch(client):
    repo = client.repo
    repo.install(repo.root(2, online=("online-2",)), "root-a", "root-b")
    repo.publish_index(repo.next_index(), "online-2")
    given = client.tmp / "root2.json"
    given.parent.mkdir(parents=True)
    given.write_bytes((repo.path / "root/2.root.json").read_bytes())
    proc = client.add("--root", str(given))
    assert proc.returncode == 0, proc.stderr
    assert (client.config / "keys/main.root.json").read_bytes() == given.read_bytes()
    conf = (client.config / "remotes.toml").read_text()
    assert 'root = "keys/main.root.json"' in conf
    assert all(repo.keys[n] in conf for n in ABC)  # its root keys, pinned
    proc = client.fetch()
    assert proc.returncode == 0, proc.stderr
    assert repo.server.gets("root/1.root.json") == [] and len(repo.server.gets("root/3.root.json")) == 1
    assert client.stored_root() == given.read_bytes()
    removed = client.run("remote", "remove", "main")
    assert removed.returncode == 0 and not (client.config / "keys/main.root.json").exists()


def test_remote_add_refuses_both_modes_and_a_malformed_root(client, tmp_path):
    repo = client.repo
    pub = tmp_path / "online-1.asc"
    pub.write_bytes(repo.keys.armored[repo.keys["online-1"]])
    proc = client.add("--key", str(pub), "--fingerprint", repo.keys["online-1"], "--root-key", repo.keys["root-a"])
    assert proc.returncode == 2 and "not both" in one_line(proc, "remote")
    proc = client.add()
    assert proc.returncode == 2
    one_line(proc, "remote")
    proc = client.add("--key", str(pub))
    assert proc.returncode == 2
    bad = tmp_path / "bad.root.json"
    bad.write_bytes((repo.path / "root/1.root.json").read_bytes().replace(b'"version": 1', b'"version": 0'))
    proc = client.add("--root", str(bad))
    assert proc.returncode == 2 and "version" in one_line(proc, "root")
    assert not (client.config / "remotes.toml").exists()
    # a config file naming both modes is refused naming the file and the field
    client.config.mkdir(parents=True)
    (client.config / "remotes.toml").write_text(
        f'[remotes.main]\nurls = ["{repo.url}"]\nkey = "k.asc"\nfingerprints = ["{repo.keys["online-1"]}"]\n'
        f'root_keys = ["{repo.keys["root-a"]}"]\n')
    proc = client.list()
    assert proc.returncode == 2
    line = one_line(proc, "config")
    assert "remotes.toml: remotes.main.root_keys: found with key" in line
    # one-off use: both pins at once is refused too
    proc = client.run("list", "--url", repo.url, "--root-key", repo.keys["root-a"], "--key", str(pub),
                      "--fingerprint", repo.keys["online-1"])
    assert proc.returncode == 2 and "not both" in one_line(proc, "url")


def test_a_legacy_remote_pinned_to_the_online_key_keeps_working(client, tmp_path):
    repo = client.repo
    pub = tmp_path / "online-1.asc"
    pub.write_bytes(repo.keys.armored[repo.keys["online-1"]])
    proc = client.add("--key", str(pub), "--fingerprint", repo.keys["online-1"])
    assert proc.returncode == 0, proc.stderr
    proc = client.fetch()
    assert proc.returncode == 0, proc.stderr
    assert not list(client.state.glob("*.root.json")) and "online" not in client.state_doc()
    assert not [p for p, _ in repo.server.log if p.startswith("root/")]  # the legacy path asks for no root


def test_verify_offline_uses_the_online_keys_of_the_stored_root(client):
    repo = client.repo
    src = repo.path / tarball_path(NEW)
    local = client.tmp / "local" / src.name
    local.parent.mkdir(parents=True)
    shutil.copy(src, local)
    local.with_name(local.name + ".asc").write_bytes(repo.keys.sign(src.read_bytes(), "online-1"))
    client.add_pinned("root-a", "root-b")
    proc = client.run("verify", str(local), "--remote", "main")
    assert proc.returncode == 2 and "run `tmplbuild list --remote main` first" in one_line(proc, "root")
    assert client.list().returncode == 0
    proc = client.run("verify", str(local))
    assert proc.returncode == 0 and f"by {repo.keys['online-1']}" in proc.stdout, proc.stderr
    proc = client.run("verify", str(local), "--remote", "main")
    assert proc.returncode == 0 and "index version 3 of remote main" in proc.stdout, proc.stderr
    # after a rotation to online-2, a file signed by online-1 no longer verifies offline
    repo.install(repo.root(2, online=("online-2",)), "root-a", "root-b")
    repo.publish_index(repo.next_index(), "online-2")
    assert client.list().returncode == 0
    proc = client.run("verify", str(local))
    assert proc.returncode == 3 and "not pinned" in one_line(proc, "signature")


# -- the state, in process -----------------------------------------------------------------------------------------

def test_state_keeps_the_newest_root_and_loads_files_from_before_roots(tmp_path, monkeypatch, keys):
    from tmplbuild.client import state
    from tmplbuild.client.trust import Seen

    monkeypatch.setenv("TMPLBUILD_STATE_DIR", str(tmp_path / "state"))
    (tmp_path / "state").mkdir()
    old = {"remote": "remote main", "repo_id": "test-repo", "version": 7, "sha256": "0" * 64,
           "accepted": "2026-01-01T00:00:00Z"}
    (tmp_path / "state/remote-main.json").write_text(json.dumps(old))
    assert state.load("remote-main") == Seen("test-repo", 7, "0" * 64)
    assert state.load_record("remote-main") == (Seen("test-repo", 7, "0" * 64), None)
    assert state.load_root("remote-main") is None
    one = rootdoc.parse(keys.root(1, ABC, ("online-1",), threshold=2))
    two = rootdoc.parse(keys.root(2, ABC, ("online-2",), threshold=2))
    # the same index, now under a root: its online keys are recorded
    state.record("remote-main", Seen("test-repo", 7, "0" * 64), "remote main", root=one)
    assert state.load_record("remote-main")[1] == (keys["online-1"],)
    assert (tmp_path / "state/remote-main.root.json").read_bytes() == one.raw
    # a rotation of the online keys lets a lower version through (the updater forgot the bar) ...
    state.record("remote-main", Seen("test-repo", 3, "1" * 64), "remote main", root=two)
    assert state.load_record("remote-main") == (Seen("test-repo", 3, "1" * 64), (keys["online-2"],))
    assert state.load_root("remote-main").raw == two.raw
    # ... but a run that still trusted root 1 never lowers the stored root, nor records its index
    state.record("remote-main", Seen("test-repo", 9, "2" * 64), "remote main", root=one)
    assert state.load_record("remote-main") == (Seen("test-repo", 3, "1" * 64), (keys["online-2"],))
    assert state.load_root("remote-main").raw == two.raw
    # and under the same online keys the bar only rises
    state.record("remote-main", Seen("test-repo", 2, "3" * 64), "remote main", root=two)
    assert state.load("remote-main").version == 3
    (tmp_path / "state/remote-main.json").write_text(json.dumps({**old, "online": ["nope"]}))
    with pytest.raises(LocalIOError, match="malformed"):
        state.load("remote-main")
    (tmp_path / "state/remote-main.root.json").write_bytes(b"{}")
    with pytest.raises(LocalIOError, match="malformed"):
        state.load_root("remote-main")
