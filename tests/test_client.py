"""The node admin's client (`tmplbuild remote`, `list`, `fetch`, `verify`) against a real, signed repository
served on 127.0.0.1 by an HTTP server that misbehaves on demand.

Every attack asserts three things: the exit code, that the destination holds nothing new (no file, no .part,
except the .part a transport failure mid-download keeps for resumption), and that the client's state file did
not change.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.conftest import ROOT, gpg
from tests.test_repo import make_artifact, other_key, publish, tmplbuild
from tmplbuild.client import trust
from tmplbuild.errors import AuthenticityError, FreshnessError, TransportError
from tmplbuild.repo import index as idx
from tmplbuild.sign.verify import Verified

CLIENT = [sys.executable, "-m", "tmplbuild"]

OLD, NEW = "12-20261120", "12-20261130"


def tarball_path(version: str, arch: str = "amd64", name: str = "demo") -> str:
    return f"templates/{name}/{version}/{name}_{version}_{arch}.tar.zst"


# -- a repository server that misbehaves on demand ---------------------------------------------------------------

class Server(ThreadingHTTPServer):
    """Serves a repository directory (dot-paths never), with switches keyed by request path (no leading /)."""

    daemon_threads = True

    def __init__(self, root: Path) -> None:
        self.root = root
        self.reset()
        super().__init__(("127.0.0.1", 0), _Handler)
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)
        self._thread.start()

    def reset(self) -> None:
        self.flip: set[str] = set()  # flip one bit in the middle of the file
        self.swap: dict[str, str] = {}  # serve another file's bytes under this path
        self.override: dict[str, bytes] = {}  # serve these bytes (another index.json / .asc pair)
        self.truncate: dict[str, list[int]] = {}  # [bytes to send, times]: full Content-Length, then close
        self.endless: set[str] = set()  # 200 without Content-Length, then bytes until the client hangs up
        self.redirect: dict[str, str] = {}  # 302 to this Location (requests with a query are not redirected)
        self.errors: dict[str, int] = {}  # answer with this status
        self.ignore_range = False  # always 200 with the whole file
        self.wrong_range = False  # 206 with the whole file and Content-Range bytes 0-...
        self.log: list[tuple[str, str | None]] = []  # (path, Range header)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def gets(self, path: str) -> list[str | None]:
        return [rng for p, rng in self.log if p == path]

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


class _Handler(BaseHTTPRequestHandler):
    server: Server

    def log_message(self, *args: object) -> None:
        pass

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for k, v in {"Content-Length": str(len(body)), **(headers or {})}.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        srv = self.server
        raw, _, query = self.path.partition("?")
        path = urllib.parse.unquote(raw).lstrip("/")
        rng = self.headers.get("Range")
        srv.log.append((path, rng))
        if path in srv.errors:
            return self._send(srv.errors[path], b"error\n")
        if path in srv.redirect and not query:
            return self._send(302, b"", {"Location": srv.redirect[path]})
        if path in srv.override:
            data = srv.override[path]
        else:
            name = srv.swap.get(path, path)
            file = srv.root / name
            if any(part.startswith(".") for part in Path(name).parts) or not file.is_file():
                return self._send(404, b"not found\n")
            data = file.read_bytes()
        if path in srv.flip:
            flipped = bytearray(data)
            flipped[len(flipped) // 2] ^= 0x01
            data = bytes(flipped)
        if path in srv.endless:
            self.send_response(200)
            self.end_headers()
            try:
                for _ in range(4096):  # 256 MiB at most, should the client not hang up
                    self.wfile.write(b"\0" * 65536)
            except OSError:
                pass
            return
        status, start, headers = 200, 0, {}
        m = re.fullmatch(r"bytes=(\d+)-", rng or "")
        if m and not srv.ignore_range and int(m.group(1)) < len(data):
            status, start = 206, int(m.group(1))
            if srv.wrong_range:
                start = 0
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        body = data[start:]
        cut = srv.truncate.get(path)
        if cut and cut[1] > 0:
            cut[1] -= 1
            self.send_response(status)
            for k, v in {"Content-Length": str(len(body)), **headers}.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body[:cut[0]])
            self.close_connection = True
            return
        self._send(status, body, headers)


# -- a signed repository, built once with tmplbuild itself --------------------------------------------------------

@dataclass
class Base:
    root: Path
    home: Path
    fpr: str
    pub: Path
    v2: tuple[bytes, bytes]  # the index pair after the first publish (version 2); the repository is at 3


def _same_size_payloads(out: Path) -> tuple[Path, Path]:
    """Two versions of `demo` whose tarballs differ in content but not in size (for the swapped-file test)."""
    rng = random.Random(7)
    text = "".join(rng.choice("0123456789abcdef") for _ in range(60000))
    first = make_artifact(out / "a", version=OLD, payload=text)
    size = (out / "a" / f"demo_{OLD}_amd64.tar.zst").stat().st_size
    for i in range(40):
        k = 1000 + 7 * i  # one hex digit changed into another: same alphabet, same statistics
        changed = text[:k] + "0123456789abcdef"[(int(text[k], 16) + 1) % 16] + text[k + 1:]
        d = out / f"b{i}"
        second = make_artifact(d, version=NEW, payload=changed)
        if (d / f"demo_{NEW}_amd64.tar.zst").stat().st_size == size:
            doc = json.loads(second.read_text())
            doc["created"] = "2026-11-30T00:00:00Z"
            second.write_text(json.dumps(doc))
            return first, second
    raise AssertionError("no equal-size payload found")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("client-base")
    home, pub = tmp / "gnupg", tmp / "pub.asc"
    proc = tmplbuild("key", "generate", "--name", "Client Test <c@example.invalid>", "--gnupghome", str(home),
                     "--out", str(pub))
    assert proc.returncode == 0, proc.stderr
    fpr = proc.stdout.strip()
    root = tmp / "repo"
    proc = tmplbuild("repo", "init", str(root), "--key", fpr, "--gnupghome", str(home), "--id", "test-repo")
    assert proc.returncode == 0, proc.stderr
    first, second = _same_size_payloads(tmp / "out")
    assert publish(root, (home, fpr), first).returncode == 0
    v2 = (root / "index.json").read_bytes(), (root / "index.json.asc").read_bytes()
    assert publish(root, (home, fpr), second).returncode == 0
    yield Base(root, home, fpr, pub, v2)
    subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "all"], capture_output=True)


def client_env(tmp: Path, config: Path, state: Path) -> dict[str, str]:
    """A node's environment: its own config and state under `tmp`, no proxy, no GNUPGHOME (the machine's real
    client state and config are never touched)."""
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower() and k != "GNUPGHOME"}
    env.update(TMPLBUILD_CONFIG_DIR=str(config), TMPLBUILD_SYSTEM_CONFIG_DIR=str(tmp / "etc"),
               TMPLBUILD_STATE_DIR=str(state), NO_PROXY="*")
    return env


def node_snapshot(dest: Path, state: Path) -> dict[str, bytes]:
    """Everything in a node's template cache and its state directory (the state lock file aside): what a refused
    run must leave as it was."""
    return {str(p): p.read_bytes() for d in (dest, state) if d.exists() for p in sorted(d.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def run_client(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """The real CLI, as a node admin runs it."""
    return subprocess.run([*CLIENT, *args], cwd=ROOT, capture_output=True, text=True, env=env, timeout=120)


@dataclass
class Client:
    tmp: Path
    base: Base
    repo: Path
    server: Server
    dest: Path
    state: Path
    config: Path

    def env(self) -> dict[str, str]:
        return client_env(self.tmp, self.config, self.state)

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return run_client(self.env(), *args)

    def pins(self, key: Path | None = None, fpr: str | None = None, urls: list[str] | None = None) -> list[str]:
        out = []
        for url in urls or [self.server.url]:
            out += ["--url", url]
        return out + ["--key", str(key or self.base.pub), "--fingerprint", fpr or self.base.fpr]

    def fetch(self, *extra: str, pins: list[str] | None = None) -> subprocess.CompletedProcess[str]:
        return self.run("fetch", "demo", "--arch", "amd64", "--dest", str(self.dest), *(pins or self.pins()), *extra)

    def list(self, *extra: str) -> subprocess.CompletedProcess[str]:
        return self.run("list", *self.pins(), *extra)

    def snapshot(self) -> dict[str, bytes]:
        return node_snapshot(self.dest, self.state)

    def state_doc(self) -> dict:
        files = [p for p in self.state.glob("*.json") if p.name != "origins.json"]  # fetch's record of sources
        assert len(files) == 1, files
        return json.loads(files[0].read_text())

    def sign(self, data: bytes) -> bytes:
        return gpg(self.base.home, "--armor", "--detach-sign", "--local-user", self.base.fpr, input=data).stdout

    def current(self) -> idx.Index:
        return idx.parse((self.repo / "index.json").read_bytes())

    def serve_index(self, data: bytes, signature: bytes | None = None) -> None:
        self.server.override = {"index.json": data, "index.json.asc": signature or self.sign(data)}


@pytest.fixture
def client(tmp_path, base):
    repo = tmp_path / "repo"
    shutil.copytree(base.root, repo, ignore=shutil.ignore_patterns(".lock"))
    server = Server(repo)
    dest = tmp_path / "cache"
    dest.mkdir()
    yield Client(tmp_path, base, repo, server, dest, tmp_path / "state", tmp_path / "config")
    server.stop()


def seen(client: Client) -> dict[str, bytes]:
    """A first successful run (state at index version 3), then the snapshot every refusal must leave alone."""
    proc = client.list()
    assert proc.returncode == 0, proc.stderr
    assert client.state_doc()["version"] == 3
    return client.snapshot()


def one_line(proc: subprocess.CompletedProcess[str], check: str) -> str:
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"tmplbuild: {check}: "), proc.stderr
    return lines[0]


# -- the happy paths ---------------------------------------------------------------------------------------------

def test_fetch_installs_the_newest_verified_template_and_records_the_index(client):
    proc = client.fetch()
    assert proc.returncode == 0, proc.stderr
    name = f"demo_{NEW}_amd64.tar.zst"
    assert sorted(p.name for p in client.dest.iterdir()) == [name]
    assert (client.dest / name).read_bytes() == (client.repo / tarball_path(NEW)).read_bytes()
    assert "fetched and verified" in proc.stdout and proc.stderr == ""
    doc = client.state_doc()
    assert (doc["repo_id"], doc["version"]) == ("test-repo", 3)
    assert doc["sha256"] == hashlib.sha256((client.repo / "index.json").read_bytes()).hexdigest()
    old = client.fetch("--version", OLD)
    assert old.returncode == 0 and (client.dest / f"demo_{OLD}_amd64.tar.zst").exists()


def test_an_unchanged_file_is_not_downloaded_twice(client):
    assert client.fetch().returncode == 0
    again = client.fetch()
    assert again.returncode == 0 and "already present and verified" in again.stdout
    assert len(client.server.gets(tarball_path(NEW))) == 1
    assert len(client.server.gets("index.json")) == 2  # the index is checked every time


def test_a_damaged_file_in_the_destination_is_replaced_and_the_output_says_so(client):
    assert client.fetch().returncode == 0
    name = f"demo_{NEW}_amd64.tar.zst"
    damaged = bytearray((client.dest / name).read_bytes())
    damaged[100] ^= 1
    (client.dest / name).write_bytes(bytes(damaged))
    again = client.fetch()
    assert again.returncode == 0, again.stderr
    assert "fetched and verified, replacing the file there, which did not match the signed size and hashes" \
        in again.stdout
    assert (client.dest / name).read_bytes() == (client.repo / tarball_path(NEW)).read_bytes()
    third = client.fetch()
    assert "already present and verified" in third.stdout and "replacing" not in third.stdout


def test_verify_after_fetch_needs_no_remote_named(client, tmp_path):
    """fetch records the remote each file came from: `verify FILE` checks it against that remote; with one
    remote configured, that one; with none to go by, exit 2 saying what is missing."""
    for name in ("main", "other"):
        assert client.run("remote", "add", name, client.server.url, "--key", str(client.base.pub),
                          "--fingerprint", client.base.fpr).returncode == 0
    got = client.run("fetch", "demo", "--arch", "amd64", "--remote", "other", "--dest", str(client.dest))
    assert got.returncode == 0, got.stderr
    path = client.dest / f"demo_{NEW}_amd64.tar.zst"
    ok = client.run("verify", str(path))
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip().endswith("size, sha256 and sha512 as in index version 3 of remote other)")
    copy = tmp_path / "elsewhere" / path.name  # the same bytes, never fetched there: no record, two remotes
    copy.parent.mkdir()
    copy.write_bytes(path.read_bytes())
    unknown = client.run("verify", str(copy))
    assert unknown.returncode == 2 and "no record of where it was fetched from" in one_line(unknown, "verify")
    assert client.run("remote", "remove", "main").returncode == 0
    only = client.run("verify", str(copy))
    assert only.returncode == 0 and "of remote other)" in only.stdout, only.stderr
    bad = bytearray(path.read_bytes())
    bad[-10] ^= 1
    path.write_bytes(bytes(bad))
    assert client.run("verify", str(path)).returncode == 3


def test_typos_file_names_and_filters_get_the_answer_a_user_needs(client):
    """A misspelt name gets "did you mean"; a file name as `list` and the page show it is understood; `list NAME`
    filters; a fingerprint written 0x... is accepted; an unknown option prints the verb's usage; --quiet keeps
    only errors and the output asked for."""
    typo = client.run("fetch", "demoo", "--dest", str(client.dest), *client.pins())
    assert typo.returncode == 2 and "(did you mean demo?)" in one_line(typo, "template")
    assert "did you mean" in one_line(client.list("demoo"), "template")
    name = f"demo_{OLD}_amd64.tar.zst"
    got = client.run("fetch", name, "--dest", str(client.dest), *client.pins())
    assert got.returncode == 0, got.stderr
    assert [p.name for p in client.dest.iterdir()] == [name]
    clash = client.run("fetch", name, "--version", NEW, "--dest", str(client.dest), *client.pins())
    assert clash.returncode == 2 and f"the file name {name} names {OLD}" in one_line(clash, "version")
    listed = client.list("demo")
    assert listed.returncode == 0 and [ln.split()[1] for ln in listed.stdout.splitlines()[1:]] == [OLD, NEW]
    hexed = client.run("list", "--url", client.server.url, "--key", str(client.base.pub),
                       "--fingerprint", "0x" + client.base.fpr.lower())
    assert hexed.returncode == 0, hexed.stderr
    unknown = client.run("fetch", "demo", "--no-such-option")
    assert unknown.returncode == 2 and unknown.stderr.startswith("usage: tmplbuild fetch ")
    assert "unrecognized arguments: --no-such-option" in unknown.stderr
    (client.dest / name).unlink()
    for quiet in (("--quiet",), ("-q",)):
        q = client.run("fetch", name, *quiet, "--dest", str(client.dest), *client.pins())
        assert (q.returncode, q.stdout, q.stderr) == (0, "", ""), q
        assert client.run("-q", "verify", str(client.dest / name), *client.pins()).stdout == ""
        (client.dest / name).unlink()
    table = client.list("--quiet")
    assert table.stdout.splitlines()[0].split() == ["NAME", "VERSION", "ARCH", "SIZE", "CREATED"]


def test_fetch_verify_and_remote_list_speak_json_with_the_field_names_of_list(client):
    assert client.run("remote", "add", "main", client.server.url, "--key", str(client.base.pub),
                      "--fingerprint", client.base.fpr).returncode == 0
    listed = json.loads(client.run("list", "--json").stdout)
    entry = next(t for t in listed["templates"] if t["version"] == NEW)
    got = client.run("fetch", "demo", "--arch", "amd64", "--dest", str(client.dest), "--json")
    assert got.returncode == 0, got.stderr
    fetched = json.loads(got.stdout)
    path = client.dest / f"demo_{NEW}_amd64.tar.zst"
    assert (fetched["status"], fetched["file"], fetched["format"]) == ("fetched", str(path), "tar.zst")
    shared = ("name", "version", "arch", "size", "sha256", "sha512")
    assert {k: fetched[k] for k in shared} == {k: entry[k] for k in shared}
    for k in ("remote", "url", "repo_id", "index_version"):
        assert fetched[k] == listed[k], k
    again = json.loads(client.run("fetch", "demo", "--arch", "amd64", "--dest", str(client.dest), "--json").stdout)
    assert again["status"] == "present"
    checked = client.run("verify", str(path), "--json")
    assert checked.returncode == 0, checked.stderr
    verified = json.loads(checked.stdout)
    assert (verified["status"], verified["file"], verified["signature"]) == ("ok", str(path), None)
    assert {k: verified["index"][k] for k in (*shared, "remote", "repo_id", "index_version")} == \
        {**{k: entry[k] for k in shared}, "remote": "main", "repo_id": "test-repo", "index_version": 3}
    remotes = json.loads(client.run("remote", "list", "--json").stdout)["remotes"]
    assert [(r["remote"], r["urls"], r["fingerprints"], r["repo_id"], r["index_version"]) for r in remotes] == \
        [("main", [client.server.url], [client.base.fpr], "test-repo", 3)]


def test_list_json_shows_the_verified_index(client):
    proc = client.list("--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert (doc["repo_id"], doc["index_version"], doc["signer"]) == ("test-repo", 3, client.base.fpr)
    assert (doc["remote"], doc["url"]) == (None, client.server.url)  # --url: no remote
    assert client.run("remote", "add", "main", client.server.url, "--key", str(client.base.pub),
                      "--fingerprint", client.base.fpr).returncode == 0
    named = json.loads(client.run("list", "--remote", "main", "--json").stdout)
    assert (named["remote"], named["url"], named["templates"]) == ("main", client.server.url, doc["templates"])
    index = json.loads((client.repo / "index.json").read_text())
    assert [(t["name"], t["version"], t["arch"], t["size"], t["sha256"], t["sha512"]) for t in doc["templates"]] == \
        [(t["name"], t["version"], t["arch"], t["size"], t["sha256"], t["sha512"]) for t in index["templates"]]
    table = client.list()
    assert table.stdout.splitlines()[0].split() == ["NAME", "VERSION", "ARCH", "SIZE", "CREATED"]
    assert len(table.stdout.splitlines()) == 3


def test_not_in_the_index_is_a_usage_error(client):
    before = seen(client)
    proc = client.fetch("--version", "12-20990101")
    assert proc.returncode == 2 and "no template demo 12-20990101 amd64 in the index" in one_line(proc, "template")
    assert client.snapshot() == before


def test_same_host_redirect_is_followed(client):
    path = tarball_path(NEW)
    client.server.redirect[path] = f"/{path}?moved"
    proc = client.fetch()
    assert proc.returncode == 0, proc.stderr
    assert client.server.log.count((path, None)) == 2



# -- the destination ---------------------------------------------------------------------------------------------

def fetch_into(client: Client, dest: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    # umask 077: the directories fetch creates are 0755 all the same (container tools read them as other users)
    return subprocess.run([*CLIENT, "fetch", "demo", "--arch", "amd64", "--dest", str(dest), *client.pins(), *extra],
                          cwd=ROOT, capture_output=True, text=True, env=client.env(), timeout=120, umask=0o077)


def test_a_dest_the_admin_named_is_created_mode_0755(client):
    dest = client.tmp / "lxc" / "templates" / "cache"
    proc = fetch_into(client, dest)
    assert proc.returncode == 0, proc.stderr
    assert (dest / f"demo_{NEW}_amd64.tar.zst").read_bytes() == (client.repo / tarball_path(NEW)).read_bytes()
    for d in (client.tmp / "lxc", client.tmp / "lxc" / "templates", dest):
        assert stat.S_IMODE(d.stat().st_mode) == 0o755, d


def test_a_failed_fetch_leaves_no_dest_it_created_except_to_resume(client):
    dest = client.tmp / "new" / "cache"
    client.serve_index((client.repo / "index.json").read_bytes(), b"not a signature")
    proc = fetch_into(client, dest)
    assert proc.returncode == 3 and not (client.tmp / "new").exists()  # refused before anything was created
    client.server.reset()
    client.server.flip.add(tarball_path(NEW))
    proc = fetch_into(client, dest)
    assert proc.returncode == 3 and "expected" in one_line(proc, "sha256")
    assert not (client.tmp / "new").exists()  # created for the download, removed with the failed download
    client.server.reset()
    client.server.truncate[tarball_path(NEW)] = [5000, 1]
    proc = fetch_into(client, dest)
    assert proc.returncode == 5  # the .part is kept to resume, and so is its directory
    assert [p.name for p in dest.iterdir()] == [f".demo_{NEW}_amd64.tar.zst.part"]
    assert fetch_into(client, dest).returncode == 0 and client.server.gets(tarball_path(NEW))[-1] == "bytes=5000-"


def test_without_dest_a_missing_template_cache_is_refused_not_created(client, monkeypatch, capsys):
    from tmplbuild import cli
    from tmplbuild.client import commands

    default = client.tmp / "var/lib/vz/template/cache"  # stands in for Proxmox VE's, absent on this host
    monkeypatch.setattr(commands, "DEFAULT_DEST", str(default))
    for k, v in client.env().items():
        monkeypatch.setenv(k, v)
    assert cli.main(["fetch", "demo", "--arch", "amd64", *client.pins()]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"tmplbuild: destination: {default}: no such directory, expected Proxmox VE's template "
                          "cache") and "not a Proxmox VE node" in err and "give --dest DIR" in err, err
    assert not (client.tmp / "var").exists()
    assert client.server.log == []  # refused before asking the repository anything

# -- integrity of the template (checks 7-9) ----------------------------------------------------------------------

def test_a_flipped_byte_in_the_tarball_is_refused(client):
    before = seen(client)
    client.server.flip.add(tarball_path(NEW))
    proc = client.fetch()
    assert proc.returncode == 3 and "expected" in one_line(proc, "sha256")
    assert client.snapshot() == before and not list(client.dest.iterdir())


def test_another_templates_file_served_in_its_place_is_refused(client):
    assert (client.repo / tarball_path(NEW)).stat().st_size == (client.repo / tarball_path(OLD)).stat().st_size
    before = seen(client)
    client.server.swap[tarball_path(NEW)] = tarball_path(OLD)
    proc = client.fetch()
    assert proc.returncode == 3, proc.stderr
    one_line(proc, "sha256")
    assert client.snapshot() == before and not list(client.dest.iterdir())


def test_an_entry_whose_file_name_does_not_match_is_refused(client):
    before = seen(client)
    doc = json.loads((client.repo / "index.json").read_text())
    doc["version"] = 4
    entry = next(t for t in doc["templates"] if t["version"] == NEW)
    wrong = f"templates/demo/{NEW}/other_{NEW}_amd64.tar.zst"
    entry["path"] = entry["files"][0]["path"] = wrong
    client.serve_index((json.dumps(doc, indent=2, sort_keys=True) + "\n").encode())
    proc = client.fetch()
    assert proc.returncode == 3 and "expected templates/demo" in one_line(proc, "entry")
    assert client.snapshot() == before


# -- the index: signature, schema, repo_id (checks 2-4) ---------------------------------------------------------

def test_a_tampered_index_with_the_old_signature_is_refused(client):
    before = seen(client)
    data = (client.repo / "index.json").read_bytes()
    client.serve_index(data.replace(b'"version": 3', b'"version": 9'), (client.repo / "index.json.asc").read_bytes())
    proc = client.fetch()
    assert proc.returncode == 3 and "bad signature" in one_line(proc, "signature")
    assert client.snapshot() == before


def test_an_index_signed_by_an_unpinned_key_is_refused(client):
    before = seen(client)
    home, _ = other_key(client.tmp, "intruder")
    data = (client.repo / "index.json").read_bytes()
    client.serve_index(data, gpg(home, "--armor", "--detach-sign", input=data).stdout)
    proc = client.fetch()
    assert proc.returncode == 3 and "not pinned" in one_line(proc, "signature")
    assert client.snapshot() == before
    subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "all"], capture_output=True)


def test_an_index_signed_by_an_expired_key_is_refused(client):
    then = ("--faked-system-time", "20200101T000000!")
    home, fpr = other_key(client.tmp, "expired", *then)
    key = client.tmp / "expired.asc"
    key.write_bytes(gpg(home, "--armor", "--export").stdout)
    data = (client.repo / "index.json").read_bytes()
    client.serve_index(data, gpg(home, *then, "--armor", "--detach-sign", input=data).stdout)
    before = client.snapshot()
    proc = client.fetch(pins=client.pins(key, fpr))
    assert proc.returncode == 3 and "expired" in one_line(proc, "signature")
    assert client.snapshot() == before
    subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "all"], capture_output=True)


def test_an_index_signed_by_a_revoked_key_is_refused(client):
    home, fpr = other_key(client.tmp, "revoked")
    data = (client.repo / "index.json").read_bytes()
    client.serve_index(data, gpg(home, "--armor", "--detach-sign", input=data).stdout)
    cert = (home / "openpgp-revocs.d" / f"{fpr}.rev").read_text().replace("\n:-----BEGIN", "\n-----BEGIN")
    gpg(home, "--import", input=cert.encode())
    key = client.tmp / "revoked.asc"
    key.write_bytes(gpg(home, "--armor", "--export", fpr).stdout)
    before = client.snapshot()
    proc = client.fetch(pins=client.pins(key, fpr))
    assert proc.returncode == 3 and "revoked" in one_line(proc, "signature")
    assert client.snapshot() == before
    subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "all"], capture_output=True)


def test_an_index_of_another_repository_is_refused_once_the_repo_id_is_pinned(client):
    before = seen(client)  # first use pinned test-repo
    cur = client.current()
    other = idx.Index(repo_id="evil-repo", version=cur.version + 1, generated=idx.stamp(time.time()),
                      expires=idx.stamp(time.time() + 3600), templates=cur.templates)
    client.serve_index(other.to_bytes())
    proc = client.fetch()
    assert proc.returncode == 3 and "found 'evil-repo', expected 'test-repo'" in one_line(proc, "repo id")
    assert client.snapshot() == before
    # Pinned by the admin from the start, it is refused on first use too.
    fresh = client.run("list", *client.pins(), "--repo-id", "other-id")
    assert fresh.returncode == 3 and "repo id" in fresh.stderr


def test_a_signed_index_that_is_not_the_schema_is_refused(client):
    before = seen(client)
    client.serve_index(b'{"schema": 1, "repo_id": "test-repo", "version": "4"}\n')
    proc = client.fetch()
    assert proc.returncode == 3
    one_line(proc, "index schema")
    assert client.snapshot() == before


# -- freshness (checks 5-6) ---------------------------------------------------------------------------------------

def test_an_older_validly_signed_index_after_a_newer_one_is_a_rollback(client):
    before = seen(client)
    client.serve_index(*client.base.v2)
    proc = client.fetch("--version", OLD)
    assert proc.returncode == 4 and "index version 2, expected at least 3" in one_line(proc, "rollback")
    assert client.snapshot() == before


def test_the_same_version_with_other_bytes_is_a_rollback(client):
    before = seen(client)
    cur = client.current()
    same = idx.Index(repo_id=cur.repo_id, version=cur.version, generated=cur.generated,
                     expires=idx.stamp(time.time() + 7200), templates=cur.templates)
    client.serve_index(same.to_bytes())
    proc = client.fetch()
    assert proc.returncode == 4 and "same version" in one_line(proc, "rollback")
    assert client.snapshot() == before


def test_an_expired_index_is_refused(client):
    before = seen(client)
    cur = client.current()
    client.serve_index(cur.successor(cur.templates, 3600, now=time.time() - 7200).to_bytes())
    proc = client.fetch()
    assert proc.returncode == 4
    one_line(proc, "index expired")
    assert client.snapshot() == before


def test_an_index_from_the_future_is_refused(client):
    before = seen(client)
    cur = client.current()
    client.serve_index(cur.successor(cur.templates, 3600, now=time.time() + 3600).to_bytes())
    proc = client.fetch()
    assert proc.returncode == 4
    one_line(proc, "index from the future")
    assert client.snapshot() == before


# -- transport (checks 1, 8) --------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", [tarball_path(NEW), "index.json.asc"])
def test_an_endless_response_is_cut_at_the_cap(client, path):
    before = seen(client)
    client.server.endless.add(path)
    proc = client.fetch()
    assert proc.returncode == 5
    one_line(proc, "download size")
    assert client.snapshot() == before and not list(client.dest.iterdir())


@pytest.mark.parametrize("path", [tarball_path(NEW), "index.json"])
def test_a_redirect_to_another_host_is_refused(client, path):
    before = seen(client)
    port = client.server.server_address[1]
    client.server.redirect[path] = f"http://localhost:{port}/{path}"
    asked = len(client.server.gets(path))
    proc = client.fetch()
    assert proc.returncode == 5 and "localhost" in one_line(proc, "redirect refused")
    assert client.snapshot() == before and not list(client.dest.iterdir())
    assert len(client.server.gets(path)) == asked + 1  # the redirect itself; its target was never asked for


def test_an_http_error_is_a_transport_failure(client):
    before = seen(client)
    client.server.errors[tarball_path(NEW)] = 500
    proc = client.fetch()
    assert proc.returncode == 5 and "HTTP 500" in one_line(proc, "http")
    assert client.snapshot() == before and not list(client.dest.iterdir())


def test_a_truncated_download_fails_and_the_next_run_resumes_it(client):
    path = tarball_path(NEW)
    data = (client.repo / path).read_bytes()
    before = seen(client)
    client.server.truncate[path] = [5000, 1]  # less than a write buffer: it must still reach the .part
    proc = client.fetch()
    assert proc.returncode == 5 and "5000 of" in one_line(proc, "truncated")
    part = client.dest / f".demo_{NEW}_amd64.tar.zst.part"
    # The resumable case: only the dot-prefixed .part is new, with what arrived; state unchanged.
    assert sorted(p.name for p in client.dest.iterdir()) == [part.name]
    assert part.read_bytes() == data[:5000]
    assert {k: v for k, v in client.snapshot().items() if k != str(part)} == before
    again = client.fetch()
    assert again.returncode == 0, again.stderr
    assert client.server.gets(path)[-1] == "bytes=5000-"
    assert (client.dest / f"demo_{NEW}_amd64.tar.zst").read_bytes() == data
    assert not part.exists()


@pytest.mark.parametrize("mode", ["ignore_range", "wrong_range"])
def test_a_resumption_the_server_misanswers_restarts_from_zero(client, mode):
    path = tarball_path(NEW)
    client.server.truncate[path] = [10000, 1]
    assert client.fetch().returncode == 5
    setattr(client.server, mode, True)
    proc = client.fetch()
    assert proc.returncode == 0, proc.stderr
    assert (client.dest / f"demo_{NEW}_amd64.tar.zst").read_bytes() == (client.repo / path).read_bytes()
    assert not (client.dest / f".demo_{NEW}_amd64.tar.zst.part").exists()


def test_a_resumed_part_with_foreign_bytes_is_refetched_whole(client):
    path = tarball_path(NEW)
    part = client.dest / f".demo_{NEW}_amd64.tar.zst.part"
    part.write_bytes(b"\0" * 5000)  # e.g. left by a mirror that served garbage, then broke off
    proc = client.fetch()
    assert proc.returncode == 0, proc.stderr
    assert client.server.gets(path) == ["bytes=5000-", None]
    assert (client.dest / f"demo_{NEW}_amd64.tar.zst").read_bytes() == (client.repo / path).read_bytes()


def test_a_part_longer_than_the_signed_size_is_discarded(client):
    path = tarball_path(NEW)
    part = client.dest / f".demo_{NEW}_amd64.tar.zst.part"
    part.write_bytes(b"x" * ((client.repo / path).stat().st_size + 1))
    proc = client.fetch()
    assert proc.returncode == 0, proc.stderr
    assert client.server.gets(path) == [None]
    assert not part.exists()


# -- mirrors -----------------------------------------------------------------------------------------------------

def _closed_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def test_mirror_failover_skips_a_bad_signature_and_a_dead_mirror(client):
    good = client.server
    bad = Server(client.repo)
    try:
        data = (client.repo / "index.json").read_bytes()
        bad.override = {"index.json": data + b" ", "index.json.asc": (client.repo / "index.json.asc").read_bytes()}
        proc = client.fetch(pins=client.pins(urls=[_closed_port(), bad.url, good.url]))
        assert proc.returncode == 0, proc.stderr
        assert (client.dest / f"demo_{NEW}_amd64.tar.zst").exists()
        assert proc.stderr.count("warning: mirror") == 2 and "bad signature" in proc.stderr
        assert bad.gets(tarball_path(NEW)) == []  # nothing is downloaded on the strength of a bad index
        # A mirror whose tarball fails its hashes is skipped too, its .part removed.
        (client.dest / f"demo_{NEW}_amd64.tar.zst").unlink()
        bad.override = {}
        bad.flip.add(tarball_path(NEW))
        proc = client.fetch(pins=client.pins(urls=[bad.url, good.url]))
        assert proc.returncode == 0 and "sha256" in proc.stderr, proc.stderr
        assert sorted(p.name for p in client.dest.iterdir()) == [f"demo_{NEW}_amd64.tar.zst"]
        bad.flip.clear()
        bad.override = {"index.json": data + b" ", "index.json.asc": (client.repo / "index.json.asc").read_bytes()}
        # All mirrors failing: the forged index (3) is reported, not the dead mirror (5).
        before = client.snapshot()
        proc = client.fetch("--version", OLD, pins=client.pins(urls=[bad.url, _closed_port()]))
        assert proc.returncode == 3 and "all 2 mirrors failed" in one_line(proc, "signature")
        assert client.snapshot() == before
    finally:
        bad.stop()


def test_a_configured_remote_fails_over_to_its_second_mirror(client):
    proc = client.run("remote", "add", "main", _closed_port(), client.server.url, "--key", str(client.base.pub),
                      "--fingerprint", client.base.fpr)
    assert proc.returncode == 0, proc.stderr
    assert (client.config / "keys/main.asc").read_bytes() == client.base.pub.read_bytes()
    fetched = client.run("fetch", "demo", "--arch", "amd64", "--dest", str(client.dest))
    assert fetched.returncode == 0, fetched.stderr
    assert client.state_doc()["remote"] == "remote main"
    listed = client.run("remote", "list")
    assert "test-repo (learned)" in listed.stdout and client.base.fpr in listed.stdout


# -- remote add, verify ------------------------------------------------------------------------------------------

def test_remote_add_refuses_a_fingerprint_that_is_not_in_the_key_file(client):
    home, fpr = other_key(client.tmp, "stranger")
    proc = client.run("remote", "add", "main", client.server.url, "--key", str(client.base.pub),
                      "--fingerprint", fpr)
    assert proc.returncode == 2 and "not among the supplied public keys" in one_line(proc, "keys")
    assert not client.config.exists()
    bad_url = client.run("remote", "add", "main", "ftp://example.org/", "--key", str(client.base.pub),
                         "--fingerprint", client.base.fpr)
    assert bad_url.returncode == 2 and not client.config.exists()
    subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "all"], capture_output=True)


def test_verify_a_local_file_offline_with_its_asc_and_against_the_index(client):
    src = client.repo / tarball_path(NEW)
    local = client.dest / src.name
    shutil.copy(src, local)
    shutil.copy(src.with_name(src.name + ".asc"), local.with_name(local.name + ".asc"))
    pins = ["--key", str(client.base.pub), "--fingerprint", client.base.fpr]
    ok = client.run("verify", str(local), *pins)
    assert ok.returncode == 0 and "signature" in ok.stdout and ok.stdout.count("\n") == 1
    online = client.run("verify", str(local), *client.pins())
    assert online.returncode == 0 and "index version 3" in online.stdout
    data = bytearray(local.read_bytes())
    data[100] ^= 1
    local.write_bytes(bytes(data))
    bad = client.run("verify", str(local), *pins)
    assert bad.returncode == 3 and "bad signature" in one_line(bad, "signature")
    local.with_name(local.name + ".asc").unlink()
    bad_online = client.run("verify", str(local), *client.pins())
    assert bad_online.returncode == 3
    one_line(bad_online, "sha256")
    nothing = client.run("verify", str(local))
    assert nothing.returncode == 2


# -- the pure checks, in order -----------------------------------------------------------------------------------

class FakeVerifier:
    """Stands in for the gpg Verifier: shows which checks run, and that trust does nothing else."""

    def __init__(self, good: bool = True) -> None:
        self.good, self.calls = good, 0

    def verify(self, data: bytes, signature: bytes) -> Verified:
        self.calls += 1
        if not self.good:
            raise AuthenticityError("signature", "bad signature")
        return Verified(fingerprint="F" * 40, signer="F" * 40, created=0)


def test_trust_checks_run_in_the_documented_order():
    now = time.time()
    expired = idx.Index(repo_id="r", version=5, generated=idx.stamp(now - 7200), expires=idx.stamp(now - 3600))
    data = expired.to_bytes()
    # 1 before 2: an oversized index never reaches gpg.
    v = FakeVerifier()
    with pytest.raises(TransportError, match="download size"):
        trust.check_index(b" " * (trust.INDEX_CAP + 1), b"sig", v, pinned_repo_id=None, last=None)
    assert v.calls == 0
    # 2 before 3-6: a bad signature over garbage is a signature failure, not a schema one.
    with pytest.raises(AuthenticityError, match="signature"):
        trust.check_index(b"not json", b"sig", FakeVerifier(good=False), pinned_repo_id=None, last=None)
    # 4 before 5, 5 before 6: wrong repo beats expired beats rollback.
    later = trust.Seen(repo_id="r", version=9, sha256="0" * 64)
    with pytest.raises(AuthenticityError, match="repo id"):
        trust.check_index(data, b"sig", FakeVerifier(), pinned_repo_id="other", last=later)
    with pytest.raises(FreshnessError, match="index expired"):
        trust.check_index(data, b"sig", FakeVerifier(), pinned_repo_id=None, last=later)
    fresh = idx.Index(repo_id="r", version=5, generated=idx.stamp(now), expires=idx.stamp(now + 60)).to_bytes()
    with pytest.raises(FreshnessError, match="rollback"):
        trust.check_index(fresh, b"sig", FakeVerifier(), pinned_repo_id=None, last=later)
    ok = trust.check_index(fresh, b"sig", FakeVerifier(), pinned_repo_id=None, last=None)
    assert ok.seen == trust.Seen("r", 5, hashlib.sha256(fresh).hexdigest())
