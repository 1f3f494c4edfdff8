"""The apt relay: lets a container in the test's isolated namespace run `apt-get update` against the mirror its
own sources name, without giving it a route out.

dnsmasq answers the archive hosts of the template's sources with SERVICE_IP; this server listens there (a socket
opened inside the test's namespace) and answers each GET from either the named mirror itself (`named`,
fetched by this process from the host's network) or a local mirror fixture (`URL`: file:// or http(s) to a
loopback server) under the same path. Only GET and HEAD, only for the hosts and paths the sources name, only to
public addresses: a source naming a loopback, private or link-local host is not relayed (no container could
reach it), and neither is https (the relay cannot present the mirror's certificate)."""
from __future__ import annotations

import ctypes
import ipaddress
import os
import socket
import threading
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import requests

from tmplbuild.boot.netns import SERVICE_IP
from tmplbuild.errors import LocalIOError, UsageError

CLONE_NEWNET = 0x40000000
FORWARDED_HEADERS = ("If-Modified-Since", "If-None-Match", "Range", "If-Range", "Accept")
RETURNED_HEADERS = ("Content-Type", "Content-Length", "Last-Modified", "ETag", "Content-Range", "Accept-Ranges")


@dataclass
class Route:
    """One archive named by the template: http://HOST/PREFIX."""

    host: str
    prefix: str


@dataclass
class Plan:
    routes: list[Route] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)  # sources that cannot be relayed, and why

    @property
    def hosts(self) -> list[str]:
        return sorted({r.host for r in self.routes})


def plan_routes(sources: Iterable[tuple[str, list[str]]], resolve: bool = True) -> Plan:
    """Which of the template's sources the relay carries, and which it refuses (with the reason)."""
    plan = Plan()
    seen: set[str] = set()
    for uri, _suites in sources:
        if uri in seen:
            continue
        seen.add(uri)
        parsed = urllib.parse.urlsplit(uri)
        host = parsed.hostname or ""
        if parsed.scheme != "http":
            plan.refused.append(f"{uri}: {parsed.scheme or 'no'} scheme (the relay carries plain http only)")
            continue
        if parsed.port not in (None, 80):
            plan.refused.append(f"{uri}: port {parsed.port} (a proxy or a local cache, not a public mirror)")
            continue
        problem = _address_problem(host, resolve)
        if problem:
            plan.refused.append(f"{uri}: {problem}")
            continue
        plan.routes.append(Route(host=host.lower(), prefix=parsed.path.rstrip("/") + "/"))
    return plan


# What no container on another host could reach: this host's loopback, link-local, unspecified, site-local and
# carrier-grade NAT ranges (a local proxy, an apt-cacher on the LAN). Documentation ranges are not listed: some
# networks route their mirrors through them.
LOCAL_NETS = [ipaddress.ip_network(n) for n in (
    "127.0.0.0/8", "0.0.0.0/8", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16", "100.64.0.0/10",
    "::1/128", "::/128", "fc00::/7", "fe80::/10")]


def _local(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    return any(addr in n for n in LOCAL_NETS if n.version == addr.version)


def _address_problem(host: str, resolve: bool) -> str | None:
    try:
        literal = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    if literal is not None:
        return f"{host} is a local address" if _local(literal) else None
    if host in ("localhost",) or host.endswith(".localhost") or "." not in host:
        return f"{host} is a local name, not a public mirror"
    if not resolve:
        return None
    try:
        infos = socket.getaddrinfo(host, 80, proto=socket.IPPROTO_TCP)
    except OSError as exc:
        return f"{host} does not resolve on this host ({exc.strerror or exc})"
    for info in infos:
        addr = ipaddress.ip_address(info[4][0])
        if _local(addr):
            return f"{host} resolves to {addr}, a local address"
    return None


def socket_in_netns(netns: str, address: tuple[str, int]) -> socket.socket:
    """A listening TCP socket inside /run/netns/NETNS, made by a short-lived thread that enters the namespace
    (setns is per thread), so this process's own connections stay on the host's network."""
    libc = ctypes.CDLL(None, use_errno=True)
    result: dict[str, object] = {}

    def worker() -> None:
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        target = os.open(f"/run/netns/{netns}", os.O_RDONLY)
        try:
            if libc.setns(target, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns")
            result["sock"] = socket.create_server(address, reuse_port=False)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            result["error"] = exc
        finally:
            libc.setns(own, CLONE_NEWNET)
            os.close(own)
            os.close(target)

    t = threading.Thread(target=worker, name="relay-netns")
    t.start()
    t.join()
    if "error" in result:
        exc = result["error"]
        raise LocalIOError("apt relay", f"cannot listen on {address[0]}:{address[1]} in {netns}: {exc}")
    return result["sock"]  # type: ignore[return-value]


class Relay:
    def __init__(self, netns: str, plan: Plan, upstream: str, log: Path) -> None:
        """upstream: "named" or a mirror fixture URL (file:///DIR, http://127.0.0.1:PORT/...)."""
        if upstream != "named":
            scheme = urllib.parse.urlsplit(upstream).scheme
            if scheme not in ("file", "http", "https"):
                raise UsageError("--apt-mirror", f"found {upstream!r}, expected `named` or a file://, http:// or https:// URL")
        self.plan = plan
        self.upstream = upstream
        self.log = log
        self.session = requests.Session()
        self.lock = threading.Lock()
        sock = socket_in_netns(netns, (SERVICE_IP, 80))
        self.server = ThreadingHTTPServer((SERVICE_IP, 80), self._handler(), bind_and_activate=False)
        self.server.socket.close()
        self.server.socket = sock
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name="apt-relay", daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.session.close()

    def note(self, line: str) -> None:
        with self.lock, open(self.log, "a") as f:
            f.write(line + "\n")

    def target(self, host: str, path: str) -> str | None:
        for route in self.plan.routes:
            if route.host == host and (path + "/").startswith(route.prefix) and ".." not in path.split("/"):
                if self.upstream == "named":
                    return f"http://{host}{path}"
                return self.upstream.rstrip("/") + path
        return None

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        relay = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib's name
                pass

            def do_HEAD(self) -> None:  # noqa: N802 - stdlib's name
                self._relay(head=True)

            def do_GET(self) -> None:  # noqa: N802 - stdlib's name
                self._relay(head=False)

            def _relay(self, head: bool) -> None:
                host = (self.headers.get("Host") or "").split(":")[0].lower()
                path = urllib.parse.urlsplit(self.path).path
                url = relay.target(host, path)
                if url is None:
                    relay.note(f"403 {host}{path} (not a source of the template)")
                    self._send(403, b"not relayed\n", head)
                    return
                if url.startswith("file://"):
                    self._file(urllib.parse.unquote(urllib.parse.urlsplit(url).path), head, host + path)
                    return
                headers = {k: v for k in FORWARDED_HEADERS if (v := self.headers.get(k))}
                headers["Accept-Encoding"] = "identity"  # bytes pass through as the mirror stores them
                try:
                    resp = relay.session.request("HEAD" if head else "GET", url, headers=headers, stream=True,
                                                 timeout=30, allow_redirects=False)
                except requests.RequestException as exc:
                    relay.note(f"502 {host}{path} ({type(exc).__name__})")
                    self._send(502, b"upstream failed\n", head)
                    return
                with resp:
                    relay.note(f"{resp.status_code} {host}{path}")
                    self.send_response(resp.status_code)
                    for k in RETURNED_HEADERS:
                        if k in resp.headers:
                            self.send_header(k, resp.headers[k])
                    if "Content-Length" not in resp.headers and not head:
                        self.send_header("Connection", "close")
                        self.close_connection = True
                    self.end_headers()
                    if not head:
                        for chunk in resp.raw.stream(65536, decode_content=False):
                            self.wfile.write(chunk)

            def _file(self, fs_path: str, head: bool, what: str) -> None:
                try:
                    data = Path(fs_path).read_bytes() if Path(fs_path).is_file() else None
                except OSError:
                    data = None
                relay.note(f"{200 if data is not None else 404} {what}")
                if data is None:
                    self._send(404, b"not found\n", head)
                else:
                    self._send(200, data, head)

            def _send(self, code: int, body: bytes, head: bool) -> None:
                self.send_response(code)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not head:
                    self.wfile.write(body)

        return Handler
