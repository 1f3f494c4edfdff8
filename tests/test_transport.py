"""The one HTTP transport (tmplbuild.transport) and its rules, seen from its three users: the builder's archive
fetches, the client (`list`, `fetch`) and the publisher (`publish --to`), against real HTTP servers on
127.0.0.1: a tiny threaded server here that trickles, holds, redirects or answers 409 on demand, and a real
`tmplbuild serve` for the concurrent publishers.

The deadline tests shrink the deadline through the environment (TMPLBUILD_DEADLINE_BASE, TMPLBUILD_MIN_RATE,
TMPLBUILD_UPLOAD_ALLOWANCE) so that a server sending one byte every 0.2 s, which the per-read timeout never
catches, is cut off after about two seconds.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests

from tests.conftest import ROOT
from tests.test_client import NEW, base, client, one_line, tarball_path  # noqa: F401 - fixtures
from tests.test_repo import index_of, make_artifact, tmplbuild
from tests.test_server import Server as RepoServer
from tests.test_server import init_repo, kill_agents, make_key
from tmplbuild import __version__
from tmplbuild.builder import archive
from tmplbuild.errors import ExitCode, PublishConflictError, TransportError
from tmplbuild.repo import remote
from tmplbuild import transport
from tmplbuild.transport import Limits, Transport

FAST = {"TMPLBUILD_DEADLINE_BASE": "2", "TMPLBUILD_MIN_RATE": "1G", "TMPLBUILD_UPLOAD_ALLOWANCE": "1"}


class Tricky(ThreadingHTTPServer):
    """Serves `root` (GET), with switches: trickle (one byte every 0.2 s after honest headers), redirect (302 to
    a Location), gzip (a Content-Encoding the client never asked for), chunked (Transfer-Encoding: chunked),
    unsized (no Content-Length: the body ends when the connection closes), drop (the connection is closed after
    the answer without a word); POST answers 409 (`conflict`) or holds the answer back for good (`hold`).
    `peers` lists the client port of every GET: one port, one connection."""

    daemon_threads = True

    def __init__(self, root: Path) -> None:
        self.root = root
        self.trickle: set[str] = set()
        self.steady: dict[str, int] = {}  # path -> bytes per second, in 16 KiB pieces
        self.redirect: dict[str, str] = {}
        self.gzip: set[str] = set()
        self.chunked: set[str] = set()
        self.unsized: set[str] = set()
        self.drop: set[str] = set()
        self.peers: list[int] = []
        self.conflict = False
        self.hold = False
        self.log: list[tuple[str, str, dict[str, str]]] = []  # (method, path, headers)
        self.stopping = threading.Event()
        super().__init__(("127.0.0.1", 0), _Tricky)
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def requests(self, method: str, path: str) -> list[dict[str, str]]:
        return [h for m, p, h in self.log if m == method and p == path]

    def stop(self) -> None:
        self.stopping.set()
        self.shutdown()
        self.server_close()


class _Tricky(BaseHTTPRequestHandler):
    server: Tricky
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:
        pass

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for k, v in {"Content-Length": str(len(body)), **(headers or {})}.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802
        srv = self.server
        path = urllib.parse.unquote(self.path.partition("?")[0]).lstrip("/")
        srv.log.append(("GET", path, dict(self.headers)))
        srv.peers.append(self.client_address[1])
        if path in srv.redirect:
            return self._send(302, b"", {"Location": srv.redirect[path]})
        file = srv.root / path
        if not path or any(p.startswith(".") for p in Path(path).parts) or not file.is_file():
            return self._send(404, b"not found\n")
        data = file.read_bytes()
        if path in srv.gzip:
            return self._send(200, data, {"Content-Encoding": "gzip"})
        if path in srv.chunked:
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(0, len(data), 1000):
                piece = data[i:i + 1000]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            self.wfile.write(b"0\r\n\r\n")
            return
        if path in srv.unsized:
            self.send_response(200)
            self.end_headers()
            self.wfile.write(data)
            self.close_connection = True
            return
        if path in srv.drop:
            self._send(200, data)
            self.close_connection = True
            return
        if path in srv.steady:
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            piece, start = 16 << 10, time.monotonic()
            try:
                for i in range(0, len(data), piece):
                    wait = start + i / srv.steady[path] - time.monotonic()
                    if wait > 0 and srv.stopping.wait(wait):
                        break
                    self.wfile.write(data[i:i + piece])
                    self.wfile.flush()
            except OSError:
                pass
            return
        if path in srv.trickle:
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            try:
                for i in range(len(data)):
                    if srv.stopping.wait(0.2):
                        break
                    self.wfile.write(data[i:i + 1])
                    self.wfile.flush()
            except OSError:
                pass
            self.close_connection = True
            return
        self._send(200, data)

    def do_POST(self) -> None:  # noqa: N802
        srv = self.server
        srv.log.append(("POST", self.path, dict(self.headers)))
        length = int(self.headers.get("Content-Length", "0"))
        while length > 0:
            chunk = self.rfile.read(min(length, 1 << 16))
            if not chunk:
                break
            length -= len(chunk)
        if srv.hold:
            srv.stopping.wait(120)  # the answer never comes (until the test ends)
            self.close_connection = True
            return
        if srv.conflict:
            return self._send(409, json.dumps({"error": "index.json: version 2, expected 3 (current + 1)",
                                               "current_version": 2}).encode(), {"Content-Type": "application/json"})
        self._send(500, b"{}")


@pytest.fixture
def tricky(tmp_path):
    root = tmp_path / "served"
    root.mkdir()
    servers: list[Tricky] = []

    def start(over: Path | None = None) -> Tricky:
        servers.append(Tricky(over or root))
        return servers[-1]

    yield start
    for s in servers:
        s.stop()


def run(args: list[str], env: dict[str, str], timeout: float = 60) -> tuple[subprocess.CompletedProcess[str], float]:
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "tmplbuild", *args], cwd=ROOT, capture_output=True, text=True,
                          env=env, timeout=timeout)
    return proc, time.monotonic() - start


# -- 1. one transport, one set of rules ---------------------------------------------------------------------------

def test_the_builder_the_client_and_the_publisher_share_the_transport():
    from tmplbuild.client import download

    assert download.Transport is Transport
    assert isinstance(archive.Fetcher().transport, Transport)
    assert archive.Fetcher().transport.allow_file and not Transport().allow_file


def test_every_path_sends_one_user_agent_identity_and_follows_same_origin_redirects_only(tricky, tmp_path):
    srv = tricky()
    (srv.root / "a").mkdir()
    (srv.root / "a/InRelease").write_bytes(b"release\n")
    srv.redirect["moved/InRelease"] = "/a/InRelease"  # same origin: followed
    srv.redirect["away/InRelease"] = f"http://localhost:{srv.server_address[1]}/a/InRelease"  # another host
    # The builder's archive fetch and the publisher's index read: both follow the same-origin redirect.
    assert archive.Fetcher().get(f"{srv.url}/moved/InRelease", 1 << 20) == b"release\n"
    assert remote.get_capped(requests.Session(), f"{srv.url}/moved/InRelease") == b"release\n"
    with Transport() as t:
        assert t.get_bytes(f"{srv.url}/moved/InRelease", 1 << 20, "InRelease") == b"release\n"
    sent = srv.requests("GET", "a/InRelease")
    assert len(sent) == 3
    for headers in sent:
        assert headers["User-Agent"] == f"tmplbuild/{__version__}"
        assert headers["Accept-Encoding"] == "identity"
    # ...and all three refuse a redirect to another origin, without asking it.
    for fetch in (lambda u: archive.Fetcher().get(u, 1 << 20), lambda u: remote.get_capped(Transport(), u),
                  lambda u: Transport().get_bytes(u, 1 << 20, "InRelease")):
        with pytest.raises(TransportError) as caught:
            fetch(f"{srv.url}/away/InRelease")
        assert caught.value.check == "redirect refused" and "localhost" in caught.value.message
    assert len(srv.requests("GET", "a/InRelease")) == 3


def test_a_content_encoding_nobody_asked_for_is_refused_by_the_builder_too(tricky):
    srv = tricky()
    (srv.root / "Packages.xz").write_bytes(b"\x1f\x8b not really gzip")
    srv.gzip.add("Packages.xz")
    with pytest.raises(TransportError) as caught:
        archive.Fetcher().get(f"{srv.url}/Packages.xz", 1 << 20)
    assert caught.value.check == "http" and "Content-Encoding gzip" in caught.value.message


def test_file_urls_for_the_builder_only_and_capped(tmp_path):
    local = tmp_path / "mirror/dists/bookworm/InRelease"
    local.parent.mkdir(parents=True)
    local.write_bytes(b"x" * 100)
    assert archive.Fetcher().get(local.as_uri(), 100) == b"x" * 100
    with pytest.raises(TransportError, match="^download size: "):
        archive.Fetcher().get(local.as_uri(), 99)
    dest = tmp_path / "cache/x.deb"
    archive.Fetcher().to_file(local.as_uri(), dest, 100)
    assert dest.read_bytes() == b"x" * 100
    with pytest.raises(TransportError, match="not accepted here"):
        Transport().get_bytes(local.as_uri(), 100, "index.json")


def test_connections_are_kept_alive_reused_and_shared_by_threads(tricky):
    srv = tricky()
    for i in range(8):
        (srv.root / f"p{i}.deb").write_bytes(bytes([i]) * 100_000)
    srv.redirect["moved.deb"] = "/p0.deb"
    with Transport() as t:
        for _ in range(3):
            assert t.get_bytes(f"{srv.url}/p0.deb", 1 << 20, "p0.deb") == b"\0" * 100_000
        assert t.get_bytes(f"{srv.url}/moved.deb", 1 << 20, "moved.deb") == b"\0" * 100_000  # 302, then 200
        assert len(srv.peers) == 5 and len(set(srv.peers)) == 1  # one connection for all five
        # Eight threads at once through one transport (the builder's .deb downloads): each gets its bytes.
        errors: list[BaseException] = []

        def worker(i: int) -> None:
            try:
                for _ in range(4):
                    assert t.get_bytes(f"{srv.url}/p{i}.deb", 1 << 20, "deb") == bytes([i]) * 100_000
            except BaseException as exc:  # noqa: BLE001 - handed to the test
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(60)
        assert not errors and len(srv.peers) == 5 + 32
        assert len(set(srv.peers)) <= 8  # connections reused, never more than one per thread


def test_chunked_and_unsized_answers_and_an_idle_connection_the_server_closed(tricky, monkeypatch):
    srv = tricky()
    data = os.urandom(5000)
    for name in ("chunked", "unsized", "dropped", "plain"):
        (srv.root / name).write_bytes(data)
    srv.chunked.add("chunked")
    srv.unsized.add("unsized")
    srv.drop.add("dropped")
    with Transport() as t:
        def get(name: str) -> bytes:
            return t.get_bytes(f"{srv.url}/{name}", 1 << 20, name)

        assert get("chunked") == data and get("plain") == data
        assert srv.peers[0] == srv.peers[1]  # a chunked answer read to its end keeps its connection
        assert get("unsized") == data and get("plain") == data
        assert srv.peers[3] != srv.peers[2]  # an answer that ends with the connection does not
        assert get("dropped") == data
        time.sleep(0.2)
        assert get("plain") == data  # the server closed the idle connection: a new one, no error
        with monkeypatch.context() as m:  # ...even when the close is not yet seen before the request is sent
            m.setattr(transport, "_dropped", lambda conn: False)
            assert get("dropped") == data
            time.sleep(0.2)
            assert get("plain") == data
        with pytest.raises(TransportError, match="download size"):
            t.get_bytes(f"{srv.url}/chunked", 4999, "chunked")  # no Content-Length to refuse early: cut at the cap
    with Transport() as t, t.open(f"{srv.url}/chunked") as reply:
        reply.expect()
        assert reply.content_length() is None and b"".join(reply.body()) == data


def test_connection_failures_keep_their_checks_and_messages(tmp_path):
    with socket_closed() as port:
        url = f"http://127.0.0.1:{port}/index.json"
        for t in (Transport(), Transport(retries=2)):
            with pytest.raises(TransportError) as caught:
                t.get_bytes(url, 100, "index.json")
            assert (caught.value.check, caught.value.message) == ("http", f"{url}: cannot connect: connection refused")
        body = tmp_path / "upload.tar"
        body.write_bytes(b"x" * 10)
        with pytest.raises(TransportError) as caught:
            Transport().post_file(url, body, {})
        assert (caught.value.check, caught.value.message) == ("upload", f"{url}: cannot connect: connection refused")
    # A name that does not resolve says so (.invalid never resolves, RFC 6761), as does a timeout with its limits.
    with pytest.raises(TransportError) as caught:
        Transport().get_bytes("http://no-such-host.invalid/index.json", 100, "index.json")
    assert caught.value.message.startswith("http://no-such-host.invalid/index.json: cannot connect: name not resolved (")


@contextlib.contextmanager
def socket_closed() -> Iterator[int]:
    """A port on 127.0.0.1 where nothing listens."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    yield port


class Forwarder(ThreadingHTTPServer):
    """A tiny forwarding HTTP proxy: GET in absolute form is fetched from its origin and answered; CONNECT is
    logged and refused (403). `log` lists (method, target)."""

    daemon_threads = True

    def __init__(self) -> None:
        self.log: list[tuple[str, str]] = []
        super().__init__(("127.0.0.1", 0), _Forward)
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


class _Forward(BaseHTTPRequestHandler):
    server: Forwarder
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802
        import http.client

        self.server.log.append(("GET", self.path))
        target = urllib.parse.urlsplit(self.path)
        upstream = http.client.HTTPConnection(target.hostname, target.port or 80, timeout=10)
        try:
            upstream.request("GET", target.path or "/", headers={
                k: v for k, v in self.headers.items() if k.lower() not in ("connection", "proxy-authorization")})
            answer = upstream.getresponse()
            data = answer.read()
        finally:
            upstream.close()
        self.send_response(answer.status)
        for k, v in answer.getheaders():
            if k.lower() not in ("connection", "content-length", "transfer-encoding", "date", "server"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_CONNECT(self) -> None:  # noqa: N802
        self.server.log.append(("CONNECT", self.path))
        self.send_response(403)
        self.send_header("Content-Length", "0")
        self.end_headers()
        self.close_connection = True


@pytest.fixture
def forwarder(monkeypatch):
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    proxy = Forwarder()
    yield proxy
    proxy.stop()


def test_http_goes_through_the_proxy_the_environment_names_unless_no_proxy_covers_the_host(tricky, forwarder,
                                                                                            monkeypatch):
    srv = tricky()
    (srv.root / "InRelease").write_bytes(b"release\n")
    url = f"{srv.url}/InRelease"
    monkeypatch.setenv("HTTP_PROXY", forwarder.url)
    with Transport() as t:
        assert t.get_bytes(url, 1 << 20, "InRelease") == b"release\n"
    assert forwarder.log == [("GET", url)]  # the absolute form, to the proxy
    headers = srv.requests("GET", "InRelease")[-1]
    assert headers["User-Agent"] == f"tmplbuild/{__version__}" and headers["Accept-Encoding"] == "identity"
    for no_proxy in ("127.0.0.1", "localhost,127.0.0.0/8", "*"):
        monkeypatch.setenv("NO_PROXY", no_proxy)
        with Transport() as t:
            assert t.get_bytes(url, 1 << 20, "InRelease") == b"release\n"
    assert len(forwarder.log) == 1 and len(srv.requests("GET", "InRelease")) == 4  # asked directly
    # https goes through a CONNECT tunnel to the origin (this proxy refuses it).
    monkeypatch.delenv("NO_PROXY")
    monkeypatch.setenv("https_proxy", forwarder.url)
    with socket_closed() as port, pytest.raises(TransportError) as caught:
        Transport().get_bytes(f"https://127.0.0.1:{port}/index.json", 100, "index.json")
    assert forwarder.log[-1] == ("CONNECT", f"127.0.0.1:{port}")
    assert caught.value.check == "http" and ": cannot connect (through the proxy 127.0.0.1:" in caught.value.message


def test_the_fetch_path_imports_neither_requests_nor_urllib3():
    probe = ("import sys\n"
             "import tmplbuild.transport, tmplbuild.client.updater, tmplbuild.client.download\n"
             "import tmplbuild.client.commands, tmplbuild.repo.remote\n"
             "print(sorted(m for m in ('requests', 'urllib3', 'urllib.request') if m in sys.modules))\n")
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=ROOT,
                          env=env)
    assert proc.stdout.strip() == "[]", proc.stdout


# -- 2. the overall deadline --------------------------------------------------------------------------------------

def test_limits_from_the_environment():
    assert Limits.from_env({}) == Limits(30.0, 256 << 10, 120.0)
    limits = Limits.from_env({"TMPLBUILD_DEADLINE_BASE": "5", "TMPLBUILD_MIN_RATE": "1M"})
    assert (limits.base, limits.min_rate) == (5.0, 1 << 20)
    assert limits.allowance(10 << 20) == 15.0
    for env in ({"TMPLBUILD_MIN_RATE": "fast"}, {"TMPLBUILD_MIN_RATE": "0"}, {"TMPLBUILD_DEADLINE_BASE": "-1"}):
        with pytest.raises(Exception) as caught:
            Limits.from_env(env)
        assert caught.value.exit_code == ExitCode.USAGE


def test_list_against_an_index_trickled_byte_by_byte_fails_at_the_deadline(client, tricky):
    srv = tricky(client.repo)
    env = {**client.env(), **FAST}
    pins = client.pins(urls=[srv.url])
    first, _ = run(["list", *pins], env)
    assert first.returncode == 0, first.stderr
    before = client.snapshot()
    srv.trickle.add("index.json")
    proc, took = run(["list", *pins], env)
    assert proc.returncode == 5
    line = one_line(proc, "download deadline")
    assert re.search(r": index\.json: \d+ bytes in \d+ s, expected 1073741824 bytes/s after the first 2 s \(a document "
                     r"dripped too slowly", line), line
    assert took < 15
    assert client.snapshot() == before and not list(client.dest.iterdir())


def test_a_dripped_index_is_refused_within_20_s_at_the_default_limits(client, tricky):
    """The default limits (no FAST): a cap-based deadline would hold the client for the 64 MiB cap's 286 s; the
    document's deadline follows what arrived, so a drip is given up after the 10 s grace."""
    srv = tricky(client.repo)
    env = {k: v for k, v in client.env().items() if not k.startswith(("TMPLBUILD_DEADLINE", "TMPLBUILD_MIN_RATE"))}
    pins = client.pins(urls=[srv.url])
    first, _ = run(["list", *pins], env)
    assert first.returncode == 0, first.stderr
    before = client.snapshot()
    srv.trickle.add("index.json")
    proc, took = run(["list", *pins], env)
    assert proc.returncode == 5 and took < 20, (took, proc.stderr)
    line = one_line(proc, "download deadline")
    assert re.search(r": index\.json: \d+ bytes in 1\d s, expected 262144 bytes/s after the first 10 s", line), line
    assert client.snapshot() == before


def test_a_large_document_and_a_template_on_a_slow_steady_link_complete(tricky, tmp_path):
    """The other side of the drip rule: a steady link at the minimum rate finishes a document that takes longer
    than the grace, and a template download keeps its size-based deadline."""
    (tmp_path / "big.json").write_bytes(os.urandom(3 << 20))
    (tmp_path / "t.tar.zst").write_bytes(os.urandom(3 << 20))
    srv = tricky(tmp_path)
    srv.steady.update({"big.json": 288 << 10, "t.tar.zst": 288 << 10})  # just above the 256 KiB/s minimum
    t = Transport(limits=Limits())
    try:
        start = time.monotonic()
        data = t.get_bytes(f"{srv.url}/big.json", 64 << 20, "big.json", document=True)
        assert data == (tmp_path / "big.json").read_bytes() and time.monotonic() - start > 10
        start = time.monotonic()
        assert t.get_bytes(f"{srv.url}/t.tar.zst", 3 << 20, "t.tar.zst") == (tmp_path / "t.tar.zst").read_bytes()
        assert time.monotonic() - start > 10
    finally:
        t.close()


def test_fetch_of_a_trickled_template_fails_at_its_deadline_and_resumes_later(client, tricky):
    srv = tricky(client.repo)
    env = {**client.env(), **FAST}
    pins = client.pins(urls=[srv.url])
    first, _ = run(["list", *pins], env)
    assert first.returncode == 0, first.stderr
    before = client.snapshot()
    srv.trickle.add(tarball_path(NEW))
    fetch = ["fetch", "demo", "--arch", "amd64", "--dest", str(client.dest), *pins]
    proc, took = run(fetch, env)
    assert proc.returncode == 5 and took < 15
    assert f"demo_{NEW}_amd64.tar.zst: " in one_line(proc, "download deadline")
    # What arrived is kept in the dot-prefixed .part for the next run; nothing else changed.
    part = client.dest / f".demo_{NEW}_amd64.tar.zst.part"
    data = (client.repo / tarball_path(NEW)).read_bytes()
    assert sorted(p.name for p in client.dest.iterdir()) == [part.name]
    assert 0 < part.stat().st_size < 100 and data.startswith(part.read_bytes())
    assert {k: v for k, v in client.snapshot().items() if k != str(part)} == before
    kept = part.stat().st_size
    srv.trickle.clear()
    again, _ = run(fetch, env)
    assert again.returncode == 0, again.stderr
    assert srv.requests("GET", tarball_path(NEW))[-1]["Range"] == f"bytes={kept}-"
    assert not part.exists()
    assert (client.dest / f"demo_{NEW}_amd64.tar.zst").read_bytes() == data


def test_the_builders_fetches_have_a_deadline(tricky, tmp_path, monkeypatch):
    for k, v in FAST.items():
        monkeypatch.setenv(k, v)
    srv = tricky()
    (srv.root / "InRelease").write_bytes(b"r" * 1000)
    (srv.root / "p.deb").write_bytes(b"d" * 1000)
    srv.trickle.update({"InRelease", "p.deb"})
    start = time.monotonic()
    with pytest.raises(TransportError) as caught:
        archive.Fetcher().get(f"{srv.url}/InRelease", 16 << 20)
    assert caught.value.check == "download deadline"
    assert re.match(r"http://127\.0\.0\.1:\d+/InRelease: \d+ s passed, allowed 2 s", caught.value.message)
    dest = tmp_path / "cache/debs/p.deb"
    with pytest.raises(TransportError, match="^download deadline: "):
        archive.Fetcher().to_file(f"{srv.url}/p.deb", dest, 1000)
    assert time.monotonic() - start < 15
    assert list(dest.parent.iterdir()) == []  # no temporary file left, no final path


# -- the publisher ------------------------------------------------------------------------------------------------

@pytest.fixture
def maintainer(tmp_path):
    key = make_key(tmp_path)
    repo = init_repo(tmp_path / "repo", key)
    token = tmp_path / "token"
    token.write_text("tok-" + secrets.token_hex(16) + "\n")
    token.chmod(0o600)
    yield key, repo, token
    kill_agents(key[0])


def last_line(proc: subprocess.CompletedProcess[str], check: str) -> str:
    """The failure line (a --skip-test publish warns first)."""
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith(f"tmplbuild: {check}: "), proc.stderr
    return line


def publish_to(url: str, key, token: Path, *artifacts: Path) -> list[str]:
    home, fpr = key
    return ["publish", "--skip-test", *map(str, artifacts), "--to", url, "--token-file", str(token), "--key", fpr,
            "--gnupghome", str(home)]


def test_an_upload_whose_answer_never_comes_fails_at_its_deadline(maintainer, tricky, tmp_path):
    key, repo, token = maintainer
    srv = tricky(repo)
    srv.hold = True
    before = index_of(repo)
    proc, took = run(publish_to(srv.url, key, token, make_artifact(tmp_path / "out")), {**os.environ, **FAST})
    assert proc.returncode == 5, proc.stderr
    assert "/api/v1/publish: " in last_line(proc, "upload deadline") and took < 20
    assert len(srv.requests("POST", "/api/v1/publish")) == 1 and index_of(repo) == before


def test_a_conflict_that_outlasts_the_publish_deadline_is_its_own_error(maintainer, tricky, tmp_path):
    key, repo, token = maintainer
    srv = tricky(repo)
    srv.conflict = True
    proc, took = run(publish_to(srv.url, key, token, make_artifact(tmp_path / "out")),
                     {**os.environ, "TMPLBUILD_PUBLISH_DEADLINE": "5"})
    assert proc.returncode == 7, proc.stderr
    line = last_line(proc, "publish conflict")
    assert "409" in line and "5 s publish deadline" in line and "transport" not in line
    posts = len(srv.requests("POST", "/api/v1/publish"))
    assert posts > 3 and took < 25  # more than the old three quick tries, each after a fresh index read
    assert len(srv.requests("GET", "index.json")) >= posts


def test_retry_conflicts_backs_off_with_jitter_until_the_deadline():
    pauses: list[float] = []
    calls: list[int] = []

    def attempt(n: int) -> str:
        calls.append(n)
        if n < 5:
            raise remote.Conflict("taken")
        return "done"

    assert remote.retry_conflicts(attempt, deadline=60, sleep=pauses.append) == "done"
    assert calls == [1, 2, 3, 4] + [5]
    for i, pause in enumerate(pauses):
        assert 0 <= pause <= min(remote.BACKOFF_MAX, remote.BACKOFF_FIRST * 2 ** i)

    def always(n: int) -> str:
        raise remote.Conflict("taken")

    with pytest.raises(PublishConflictError) as caught:
        remote.retry_conflicts(always, deadline=0.5, sleep=time.sleep)
    assert caught.value.exit_code == ExitCode.LOCAL_IO and caught.value.check == "publish conflict"


def test_eight_concurrent_publishers_all_succeed(maintainer, tmp_path):
    key, repo, token = maintainer
    server = RepoServer(repo, tmp_path / "logs", "--token-file", str(token), workers=2)
    try:
        artifacts = [make_artifact(tmp_path / f"out{i}", name=f"demo{i}", payload=f"{i}\n") for i in range(8)]
        env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
        start = time.monotonic()
        procs = [subprocess.Popen([sys.executable, "-m", "tmplbuild", *publish_to(server.base, key, token, a)],
                                  cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
                 for a in artifacts]
        results = [(p.wait(timeout=120), *p.communicate()) for p in procs]
        took = time.monotonic() - start
        assert [code for code, _, _ in results] == [0] * 8, [err for _, _, err in results]
        from tmplbuild.sign.keys import agent_running

        # They shared one gpg-agent: none stopped it under another's feet, and the last one out did.
        assert not agent_running(key[0])
        index = index_of(repo)
        assert index["version"] == 1 + 8
        assert sorted(t["name"] for t in index["templates"]) == sorted(f"demo{i}" for i in range(8))
        assert tmplbuild("repo", "verify", str(repo)).returncode == 0
        assert took < 100  # about 25 s here: one after the other, each after a short random pause
    finally:
        server.stop()
