"""The repository server (`tmplbuild serve`) with a root of trust: a real gunicorn process on 127.0.0.1 (started
as tests/test_server.py does), real gpg throwaway keys. Root uploads on POST /api/v1/publish (TUF's successor
rule: accepted, or refused with nothing written), index uploads checked against the newest root's online keys,
an expired root, the page and the API showing the root, and the publisher's side (`publish --to`,
tmplbuild.repo.remote.publish_root_remote)."""
from __future__ import annotations

import re
import secrets
import shlex
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from tests.conftest import Keys
from tests.test_repo import index_of, make_artifact, tmplbuild
from tests.test_repo_root import ROOT_KEYS, install, legacy_repo, who
from tests.test_server import (Server, _Pre, post, published_copy, run_page_command, snapshot, tar_bytes,
                               upload_members)
from tmplbuild.errors import AuthenticityError, FreshnessError
from tmplbuild.repo import chain as repochain
from tmplbuild.repo import remote

V2, V3 = "12-20261130", "12-20261201"


@dataclass
class World:
    tmp: Path
    keys: Keys
    a: Path  # the served repository: one template, root 1 naming online-1
    b: Path  # a copy with one more template published by online-1 under root 1 (index version 3)
    token: str
    token_file: Path
    server: Server | None = None

    def start(self) -> Server:
        self.server = Server(self.a, self.tmp / "logs", "--token-file", str(self.token_file))
        return self.server

    def post(self, members: list[tuple[str, bytes]]) -> requests.Response:
        assert self.server is not None
        return post(self.server, tar_bytes(members), self.token)

    def index_upload(self) -> list[tuple[str, bytes]]:
        """What a publisher of B's new template sends: its files and index pair (keys/ and root/ are no upload's)."""
        return [m for m in upload_members(self.a, self.b) if not m[0].startswith(("keys/", "root/"))]

    def root_members(self, version: int, online: tuple[str, ...], signers: tuple[str, ...] = ROOT_KEYS,
                     root: tuple[str, ...] = ROOT_KEYS, threshold: int = 2) -> list[tuple[str, bytes]]:
        data = self.keys.root(version, root, online, threshold=threshold)
        return [(f"root/{version}.root.json", data), (f"root/{version}.root.json.asc", self.keys.sign(data, *signers))]


@pytest.fixture
def world(tmp_path, keys):
    a = legacy_repo(tmp_path, keys)
    install(a, keys, 1, ("online-1",))
    b = published_copy(a, tmp_path / "b", who(keys, "online-1"),
                       make_artifact(tmp_path / "v2", version=V2, payload="two\n"))
    token = "tok-" + secrets.token_hex(16)
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)
    w = World(tmp_path, keys, a, b, token, token_file)
    yield w
    if w.server is not None:
        w.server.stop()


def test_a_root_upload_signed_by_the_root_keys_is_installed(world):
    server = world.start()
    r = world.post(world.root_members(2, ("online-2",)))
    assert r.status_code == 200, r.text
    assert r.json() == {"root": 2}
    assert sorted(p.name for p in (world.a / "root").iterdir()) == [
        "1.root.json", "1.root.json.asc", "2.root.json", "2.root.json.asc"]
    assert (world.a / f"keys/{world.keys['online-2']}.asc").is_file()
    assert not (world.a / f"keys/{world.keys['online-1']}.asc").exists()
    got = requests.get(server.url("/root/2.root.json"), timeout=10)
    assert got.status_code == 200 and got.content == (world.a / "root/2.root.json").read_bytes()
    # The page and the API show the newest root; the index in place is still online-1's: stale until re-signed.
    api = requests.get(server.url("/api/v1/templates"), timeout=10).json()
    assert api["root"]["version"] == 2 and api["root"]["online_keys"]["keys"] == [world.keys["online-2"]]
    assert api["root"]["root_keys"] == {"keys": [world.keys[n] for n in ROOT_KEYS], "threshold": 2}
    assert api["root"]["index_stale"] is True
    page = requests.get(server.url("/"), timeout=10).text
    assert "root 2</a>" in page and world.keys["online-2"] in page and world.keys["root-b"] in page
    assert "no longer names" in page


@pytest.mark.parametrize("case", ["under threshold", "new keys only", "rollback", "version skip",
                                  "name and version differ", "with an index"])
def test_a_root_upload_that_breaks_the_successor_rule_is_refused_and_nothing_is_written(world, case):
    world.start()
    if case == "under threshold":
        members, status, words = world.root_members(2, ("online-2",), signers=("root-a",)), 422, "root signature"
    elif case == "new keys only":  # the thief's own root: its root keys sign it, the trusted root's do not
        members = world.root_members(2, ("thief",), signers=("thief",), root=("thief",), threshold=1)
        status, words = 422, "by the root keys of root 1"
    elif case == "rollback":  # root 1 again, validly signed
        members = [("root/1.root.json", (world.a / "root/1.root.json").read_bytes()),
                   ("root/1.root.json.asc", (world.a / "root/1.root.json.asc").read_bytes())]
        status, words = 409, "root rollback"
    elif case == "version skip":
        members, status, words = world.root_members(3, ("online-2",)), 409, "version 3, expected 2"
    elif case == "name and version differ":
        members = [(name.replace("root/3", "root/2"), data) for name, data in world.root_members(3, ("online-2",))]
        status, words = 422, "holds root version 3, expected 2"
    else:
        members, status, words = world.root_members(2, ("online-2",)) + world.index_upload(), 400, \
            "root/<N>.root.json and root/<N>.root.json.asc only"
    before = snapshot(world.a)
    r = world.post(members)
    assert r.status_code == status, r.text
    assert words in r.json()["error"]
    assert snapshot(world.a) == before
    assert sorted(p.name for p in (world.a / "root").iterdir()) == ["1.root.json", "1.root.json.asc"]


def test_an_index_signed_by_a_removed_online_key_is_refused(world):
    world.start()
    assert world.post(world.root_members(2, ("online-2",))).status_code == 200
    before = snapshot(world.a)
    r = world.post(world.index_upload())  # B: signed by online-1, which root 2 dropped
    assert r.status_code == 422, r.text
    assert r.json()["error"].startswith("index.json.asc: signature")
    assert snapshot(world.a) == before
    assert index_of(world.a)["version"] == 2


def test_an_upload_under_the_current_root_is_published(world):
    server = world.start()
    r = world.post(world.index_upload())
    assert r.status_code == 200, r.text
    assert r.json()["version"] == 3
    assert requests.get(server.url("/api/v1/templates"), timeout=10).json()["root"]["index_stale"] is False
    assert tmplbuild("repo", "verify", str(world.a)).returncode == 0


def test_an_expired_root_refuses_every_index_upload(world):
    # Root 2, as a root holder would have installed it ten days ago: expired nine days ago.
    data = world.keys.root(2, ROOT_KEYS, ("online-1",), threshold=2, now=time.time() - 10 * 86400)
    (world.a / "root/2.root.json.asc").write_bytes(world.keys.sign(data, *ROOT_KEYS))
    (world.a / "root/2.root.json").write_bytes(data)
    server = world.start()
    before = snapshot(world.a)
    r = world.post(world.index_upload())
    assert r.status_code == 422, r.text
    assert "root expired" in r.json()["error"] and "\n" not in r.json()["error"]
    assert snapshot(world.a) == before
    assert requests.get(server.url("/api/v1/templates"), timeout=10).json()["root"]["expired"] is True
    # The way out: a new root from the root key holders, uploaded like any other.
    assert world.post(world.root_members(3, ("online-1",))).status_code == 200
    r = world.post(world.index_upload())
    assert r.status_code == 200, r.text


def test_publish_root_remote_and_the_review_step_of_publish_to(world):
    server = world.start()
    k = world.keys
    two = k.root(2, ROOT_KEYS, ("online-2",), threshold=2)
    with pytest.raises(AuthenticityError, match="the server answered 422"):  # under the threshold
        remote.publish_root_remote(server.base, two, k.sign(two, "root-a"), world.token)
    assert remote.publish_root_remote(server.base, two, k.sign(two, *ROOT_KEYS), world.token) == 2
    with pytest.raises(FreshnessError, match="409"):
        remote.publish_root_remote(server.base, two, k.sign(two, *ROOT_KEYS), world.token)

    # publish --to pins the publisher's own key for the server's index: online-2 does not build on online-1's
    # index without review, and the error says what to do.
    argv = ("publish", "--skip-test", str(make_artifact(world.tmp / "v3", version=V3, payload="three\n")),
            "--to", server.base, "--token-file", str(world.token_file), "--gnupghome", str(k.home))
    proc = tmplbuild(*argv, "--key", k["online-2"])
    assert proc.returncode == 3, proc.stderr
    assert "the server's current index" in proc.stderr and "--carry-over" in proc.stderr
    # The thief's key is refused by the server whatever it pins.
    proc = tmplbuild(*argv, "--key", k["online-1"])
    assert proc.returncode == 3 and "the server answered 422" in proc.stderr, proc.stderr
    # Review, then carry the index over on the server's directory (the lock is shared with the server).
    proc = tmplbuild("repo", "resign", str(world.a), "--carry-over", "--key", k["online-2"], "--gnupghome",
                     str(k.home))
    assert proc.returncode == 0, proc.stderr
    proc = tmplbuild(*argv, "--key", k["online-2"])
    assert proc.returncode == 0, proc.stderr
    assert index_of(world.a)["version"] == 4
    assert tmplbuild("repo", "verify", str(world.a)).returncode == 0


def test_the_pages_root_pinning_commands_fetch_the_template(world):
    """With a root, the page tells node admins to pin root key fingerprints (as many as the threshold); those
    commands, with the fingerprints put in, fetch the template."""
    k = world.keys
    three = k.root(2, ("root-a", "root-b", "root-c"), ("online-1",), threshold=2)  # root keys 2 of 3
    repochain.install(world.a, three, k.sign(three, "root-a", "root-b", "root-c"))
    server = world.start()
    page = requests.get(server.url("/"), timeout=10).text
    assert "root of trust" in page and "out of band" in page
    parser = _Pre()
    parser.feed(page)
    shown = [line for block in parser.blocks for line in block.splitlines() if line.startswith("tmplbuild ")]
    assert [shlex.split(c)[1] for c in shown[:4]] == ["remote", "list", "fetch", "fetch"], shown
    assert all("--key" not in c for c in shown[:4]) and shown[0].count("--root-key") == 2  # a 2-of-3 root
    pins = [k["root-a"], k["root-c"]]  # two of its three root keys (root-c is new: the client anchors on root 2)
    commands = []
    for command in shown[:4]:
        for n, fpr in enumerate(pins, 1):
            command = command.replace(f"ROOT-FINGERPRINT-{n}", fpr)
        commands.append(command)
    tarball = next(world.a.glob("templates/demo/*/*.tar.zst"))
    for n, group in enumerate((commands[:3], commands[3:])):
        home, dest = world.tmp / f"admin{n}", world.tmp / f"cache{n}"
        home.mkdir()
        dest.mkdir()
        for command in group:
            out = run_page_command(command, home, dest, "--arch", "amd64")
            if shlex.split(command)[1] == "list":
                assert re.search(r"^demo\s", out, re.M), out
        assert [p.name for p in dest.iterdir()] == [tarball.name]


def test_root_publish_to_a_server_through_the_cli(world):
    """`tmplbuild root publish FILE --to URL --token-file F`: the holders' signed root reaches the server, which
    installs it; the same file again is not the next version (exit 4) and changes nothing."""
    server = world.start()
    (path, data), (_, sig) = world.root_members(2, ("online-2",))
    draft = world.tmp / "2.root.json"
    draft.write_bytes(data)
    Path(f"{draft}.asc").write_bytes(sig)
    proc = tmplbuild("root", "publish", str(draft), "--to", server.base, "--token-file", str(world.token_file))
    assert proc.returncode == 0, proc.stderr
    assert f"published root 2 to {server.base}" in proc.stdout
    assert (world.a / path).read_bytes() == data
    before = sorted(p.name for p in (world.a / "root").iterdir())
    proc = tmplbuild("root", "publish", str(draft), "--to", server.base, "--token-file", str(world.token_file))
    assert proc.returncode == 4, proc.stderr
    assert sorted(p.name for p in (world.a / "root").iterdir()) == before
    proc = tmplbuild("root", "publish", str(draft), "--to", server.base)
    assert proc.returncode == 2 and "--to needs --token-file" in proc.stderr
