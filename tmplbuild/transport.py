"""The one HTTP transport of tmplbuild: the builder's archive fetches (InRelease, Packages, .debs), the client's
index and template downloads, and the publisher's index reads and uploads all go through `Transport`, under one
set of rules:

- one User-Agent (`tmplbuild/VERSION`) and `Accept-Encoding: identity`: the bytes hashed are the bytes served,
  and Range offsets are file offsets; an answer with another Content-Encoding is refused;
- redirects are followed by hand, at most three, and only to the same scheme, host and port;
- every body is read raw and capped by the caller's limit (a larger Content-Length is refused before reading);
- a per-read timeout (no byte for READ_TIMEOUT seconds) and an overall deadline per request: DEADLINE_BASE
  seconds plus the expected size at MIN_RATE bytes/s (the signed size for a template or .deb, the cap for an
  index, signature or manifest, the body's size for an upload). A server that trickles one byte just inside the
  read timeout cannot stall a run for longer than that. `TMPLBUILD_DEADLINE_BASE` (seconds) and
  `TMPLBUILD_MIN_RATE` (bytes/s, K/M/G suffixes allowed) change both;
- an upload's deadline adds UPLOAD_SERVER_ALLOWANCE (120 s, `TMPLBUILD_UPLOAD_ALLOWANCE`) for the server's
  checks and its wait for the repository lock;
- file:// URLs only where a Transport is made with allow_file=True (the builder's local mirrors).

Every failure is a TransportError (exit 5) naming what failed; deadline failures have the check
"download deadline" or "upload deadline".

The deadline is enforced by a watchdog timer: when it passes, the sockets of the request in flight are shut down,
which wakes any read or write blocked on them; the reader then reports the deadline, not a broken connection.

The backend is the standard library's http.client (no third-party HTTP stack: `tmplbuild fetch` starts faster).
Connections are kept alive in a small LIFO pool per (scheme, host, port, proxy), shared by threads; one goes back
to the pool only when its answer was read to the end and the server did not announce a close. HTTPS verifies the
certificate and the host name against the system's CAs (ssl.create_default_context(); OpenSSL's SSL_CERT_FILE and
SSL_CERT_DIR apply). Proxies come from the environment as curl and apt read them: http_proxy / HTTP_PROXY,
https_proxy / HTTPS_PROXY, all_proxy, and no_proxy / NO_PROXY (host names, domain suffixes, `*`, IP networks);
plain http goes to the proxy in absolute form, https through a CONNECT tunnel.
"""
from __future__ import annotations

import http.client
import os
import re
import select
import socket
import ssl  # already imported by http.client; the CA store is loaded only for the first https URL
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tmplbuild import __version__
from tmplbuild.errors import OversizeError, TransportError, UsageError

USER_AGENT = f"tmplbuild/{__version__}"
CONNECT_TIMEOUT = 10  # seconds to connect
READ_TIMEOUT = 30  # seconds between two bytes of an answer
UPLOAD_READ_TIMEOUT = 300  # seconds a server may take to check an upload before it answers
TIMEOUT = (CONNECT_TIMEOUT, READ_TIMEOUT)
MAX_REDIRECTS = 3
CHUNK = 1 << 20
DEFAULT_DEADLINE_BASE = 30.0  # seconds every request gets on top of its size at the minimum rate
DEFAULT_MIN_RATE = 256 << 10  # bytes/s (2 Mbit/s): slower than this on average, a download is given up
# A small signed document (index, root, signature, manifest, SBOM) has no size known in advance, only a cap far above
# what it usually is (an index of 10,000 template versions is 43 MB). Its deadline follows what arrived instead: this
# many seconds (at most the base) plus the bytes received at the minimum rate, never more than the cap's deadline. A
# server dripping a few bytes at a time is given up after about this long; a steady link at the minimum rate or
# faster finishes however large the document.
DOCUMENT_GRACE = 10.0
UPLOAD_SERVER_ALLOWANCE = 120.0  # seconds added to an upload's deadline: the server waits up to this for its lock
REPLY_CAP = 64 << 10  # bytes of an upload's JSON answer
SEND_BLOCK = 1 << 20  # bytes of an upload's body per write
DRAIN_CAP = 64 << 10  # bytes of a redirect's body read to keep its connection alive
ENV_BASE = "TMPLBUILD_DEADLINE_BASE"
ENV_RATE = "TMPLBUILD_MIN_RATE"
ENV_UPLOAD = "TMPLBUILD_UPLOAD_ALLOWANCE"
_REDIRECTS = {301, 302, 303, 307, 308}
_DEFAULT_PORTS = {"http": 80, "https": 443}


# -- limits and deadlines -----------------------------------------------------------------------------------------

def parse_rate(text: str, name: str = ENV_RATE) -> int:
    """`262144`, `256K`, `1M`, `1MiB` → bytes per second. Raises UsageError."""
    m = re.fullmatch(r"(\d+)\s*([KMG]?)(?:i?B)?(?:/s)?", text.strip(), re.I)
    if not m or int(m.group(1)) == 0:
        raise UsageError("min rate", f"{name}={text!r}, expected bytes per second (a positive number, optionally "
                                     "with K, M or G, e.g. 256K)")
    return int(m.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30}[m.group(2).upper()]


def parse_seconds(text: str, name: str = ENV_BASE) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0 or value == float("inf"):
        raise UsageError("deadline", f"{name}={text!r}, expected a positive number of seconds")
    return value


@dataclass(frozen=True)
class Limits:
    """How long a request may take: `base` seconds plus its expected size at `min_rate` bytes/s; an upload gets
    `upload_allowance` seconds more for the server's checks and its wait for the repository lock."""

    base: float = DEFAULT_DEADLINE_BASE
    min_rate: int = DEFAULT_MIN_RATE
    upload_allowance: float = UPLOAD_SERVER_ALLOWANCE

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Limits:
        """The defaults, overridden by TMPLBUILD_DEADLINE_BASE, TMPLBUILD_MIN_RATE and
        TMPLBUILD_UPLOAD_ALLOWANCE. Raises UsageError."""
        env = os.environ if environ is None else environ
        base = parse_seconds(env[ENV_BASE]) if env.get(ENV_BASE, "").strip() else DEFAULT_DEADLINE_BASE
        rate = parse_rate(env[ENV_RATE]) if env.get(ENV_RATE, "").strip() else DEFAULT_MIN_RATE
        upload = parse_seconds(env[ENV_UPLOAD], ENV_UPLOAD) if env.get(ENV_UPLOAD, "").strip() \
            else UPLOAD_SERVER_ALLOWANCE
        return cls(base, rate, upload)

    def allowance(self, size: int, extra: float = 0.0) -> float:
        return self.base + extra + max(size, 0) / self.min_rate


class Deadline:
    """The overall time allowed for one request and its body. Armed as a context manager: a timer then shuts
    down the sockets the request uses when the time is up."""

    def __init__(self, kind: str, what: str, size: int, limits: Limits, extra: float = 0.0,
                 progress: bool = False) -> None:
        self.kind, self.what, self.limits, self.extra = kind, what, limits, extra
        self.start = time.monotonic()
        self.size = size
        self.progress = progress  # a small document's deadline: the grace plus what arrived (DOCUMENT_GRACE)
        self.received = 0
        self.allowed = self._allowance()
        self.fired = False
        self._lock = threading.Lock()
        self._conns: list[object] = []
        self._timer: threading.Timer | None = None
        self._active = False

    @property
    def grace(self) -> float:
        """A document's seconds before the bytes must arrive at the minimum rate."""
        return min(self.limits.base, DOCUMENT_GRACE)

    def _allowance(self) -> float:
        full = self.limits.allowance(self.size, self.extra)
        if not self.progress:
            return full
        return min(full, self.grace + self.extra + self.received / self.limits.min_rate)

    def advance(self, n: int) -> None:
        """`n` more bytes arrived: a document's deadline moves on with them (the timer re-arms when it wakes)."""
        if self.progress:
            with self._lock:
                self.received += n
                self.allowed = self._allowance()

    @property
    def end(self) -> float:
        return self.start + self.allowed

    @property
    def expired(self) -> bool:
        return self.fired or time.monotonic() > self.end

    def extend(self, size: int) -> None:
        """Allow for `size` bytes from the start (a resumed download that gets the whole file after all)."""
        with self._lock:
            self.size = size
            self.allowed = self._allowance()
            if self._active:
                self._arm()

    def check(self) -> None:
        if self.expired:
            raise self.error()

    def error(self) -> TransportError:
        elapsed = time.monotonic() - self.start
        extra = f" + {self.extra:g} s for the server" if self.extra else ""
        env = f"{ENV_BASE}, {ENV_RATE}" + (f", {ENV_UPLOAD}" if self.extra else "")
        if self.progress and self.allowed < self.limits.allowance(self.size, self.extra):
            return TransportError(f"{self.kind} deadline", (
                f"{self.what}: {self.received} bytes in {elapsed:.0f} s, expected {self.limits.min_rate} bytes/s "
                f"after the first {self.grace:g} s (a document dripped too slowly; {env} change this)"))
        return TransportError(f"{self.kind} deadline", (
            f"{self.what}: {elapsed:.0f} s passed, allowed {self.allowed:.0f} s ({self.limits.base:g} s{extra} + "
            f"{self.size} bytes at {self.limits.min_rate} bytes/s; {env} change this)"))

    def watch(self, conn: object) -> None:
        """Shut `conn` (a socket, or a connection whose socket it is at that moment) down when the time is up."""
        with self._lock:
            self._conns.append(conn)
            if self.fired:
                _shutdown(conn)

    def _arm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = threading.Timer(max(self.end - time.monotonic(), 0.0), self._fire)
        self._timer.daemon = True
        self._timer.start()

    def _fire(self) -> None:
        with self._lock:
            if not self._active:
                return
            if time.monotonic() < self.end - 0.01:  # woke early, or extended meanwhile
                self._arm()
                return
            self.fired = True
            for conn in self._conns:
                _shutdown(conn)

    def __enter__(self) -> Deadline:
        with self._lock:
            self._active = True
            self._arm()
        return self

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self._active = False
            if self._timer is not None:
                self._timer.cancel()
            self._conns.clear()


def _shutdown(conn: object) -> None:
    sock = conn if isinstance(conn, socket.socket) else getattr(conn, "sock", None)
    if sock is None:
        return
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)  # the plain socket's: no TLS state is touched
    except (OSError, TypeError):
        pass


# -- connections --------------------------------------------------------------------------------------------------

class _HTTPConnection(http.client.HTTPConnection):
    """Connects within CONNECT_TIMEOUT, then allows `read_timeout` for each read or write on the socket."""

    read_timeout: float = READ_TIMEOUT

    def connect(self) -> None:
        super().connect()
        self.sock.settimeout(self.read_timeout)


class _HTTPSConnection(http.client.HTTPSConnection):
    """The same over TLS (through a CONNECT tunnel when set_tunnel named the origin)."""

    read_timeout: float = READ_TIMEOUT

    def connect(self) -> None:
        super().connect()
        self.sock.settimeout(self.read_timeout)


_tls_lock = threading.Lock()
_tls: ssl.SSLContext | None = None


def _tls_context() -> ssl.SSLContext:
    """One client context for the process: the system's CAs, certificate and host name checked."""
    global _tls
    with _tls_lock:
        if _tls is None:
            _tls = ssl.create_default_context()
        return _tls


def _dropped(conn: http.client.HTTPConnection) -> bool:
    """True if an idle connection's socket is gone, or readable (the server closed it, or sent what nobody
    asked for): it must not carry another request."""
    sock = conn.sock
    if sock is None:
        return True
    try:
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        return bool(poller.poll(0))
    except (OSError, ValueError):
        return True


# -- proxies from the environment ---------------------------------------------------------------------------------

_PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")


class _Proxy(tuple):
    """(host, port, auth): auth is a Proxy-Authorization value, from user:password in the proxy's URL."""

    __slots__ = ()

    def __new__(cls, host: str, port: int, auth: str | None) -> _Proxy:
        return super().__new__(cls, (host, port, auth))

    host = property(lambda self: self[0])
    port = property(lambda self: self[1])
    auth = property(lambda self: self[2])

    def __repr__(self) -> str:
        return f"_Proxy({self[0]!r}, {self[1]})"  # never the credentials


def proxy_for(scheme: str, host: str, port: int) -> _Proxy | None:
    """The proxy the environment names for this origin (http_proxy, https_proxy, all_proxy, in lower or upper
    case, lower first), unless no_proxy / NO_PROXY covers the host. Raises TransportError for a proxy URL that is
    not http://."""
    env = os.environ
    if not any(env.get(k) for k in _PROXY_VARS):
        return None  # the common case: no urllib.request to import
    import urllib.request

    proxies = urllib.request.getproxies_environment()
    url = proxies.get(scheme) or proxies.get("all")
    if not url or _bypass(host, port, proxies.get("no", "")):
        return None
    parts = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
    try:
        proxy_port = parts.port or 80
    except ValueError:
        proxy_port = -1
    if parts.scheme.lower() != "http" or not parts.hostname or proxy_port < 0:
        shown = f"{parts.scheme}://{parts.hostname or ''}" + (f":{parts.port}" if proxy_port > 0 and parts.port else "")
        raise TransportError("http", f"proxy {shown} (from the environment): expected http://host[:port]")
    auth = None
    if parts.username is not None:
        import base64

        pair = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
        auth = "Basic " + base64.b64encode(pair.encode()).decode("ascii")
    return _Proxy(parts.hostname, proxy_port, auth)


def _bypass(host: str, port: int, no_proxy: str) -> bool:
    if not no_proxy.strip():
        return False
    import urllib.request

    if urllib.request.proxy_bypass_environment(host if ":" in host else f"{host}:{port}", {"no": no_proxy}):
        return True
    if "/" in no_proxy:  # IP networks (10.0.0.0/8), for a host given as an address
        import ipaddress

        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        for entry in no_proxy.replace(" ", "").split(","):
            try:
                if "/" in entry and address in ipaddress.ip_network(entry, strict=False):
                    return True
            except ValueError:
                continue
    return False


# -- requests and answers -----------------------------------------------------------------------------------------

def origin(url: str) -> tuple[str, str, int]:
    parts = urllib.parse.urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = -1
    scheme = parts.scheme.lower()
    return scheme, (parts.hostname or "").lower(), port or _DEFAULT_PORTS.get(scheme, -1)


def _reason(exc: BaseException, read_timeout: float = READ_TIMEOUT) -> str:
    if isinstance(exc, TimeoutError):  # socket.timeout too
        return f"timed out (connect {CONNECT_TIMEOUT} s, read {read_timeout:g} s)"
    if isinstance(exc, ssl.SSLError):
        return f"cannot connect (TLS: {getattr(exc, 'verify_message', None) or exc.reason or exc})"
    if isinstance(exc, socket.gaierror):
        return f"cannot connect: name not resolved ({exc.strerror or exc})"
    if isinstance(exc, ConnectionRefusedError):
        return "cannot connect: connection refused"
    if isinstance(exc, ConnectionResetError):
        return "connection reset by the server"
    if isinstance(exc, http.client.HTTPException):
        return f"not an HTTP response ({type(exc).__name__})"
    if isinstance(exc, OSError):
        return f"cannot connect: {exc.strerror or exc}" if exc.errno else f"cannot connect ({exc})"
    return f"{type(exc).__name__}: {exc}"


class Broken(Exception):
    """The connection broke (or a read timed out) before the end of the body."""


_READ_ERRORS = (http.client.HTTPException, OSError, ValueError)
_STALE = (ConnectionError, http.client.BadStatusLine, ssl.SSLEOFError, ssl.SSLZeroReturnError)
_SAFE = "!#$%&'()*+,/:;=?@[]~"  # what stays as it is in a request target (the rest is percent-encoded)


class _Headers(dict):
    """A file's one header, read as an answer's headers are (case-insensitive get)."""

    def get(self, key: str, default=None):  # type: ignore[override]
        for k, v in self.items():
            if k.lower() == key.lower():
                return v
        return default


class Reply:
    """One answer: status, headers and a raw body read under the request's deadline. A context manager; closing
    it disarms the deadline and gives the connection back to its transport's pool if the body was read to the
    end (else closes it)."""

    def __init__(self, url: str, deadline: Deadline, resp: http.client.HTTPResponse | None = None, file=None,
                 file_size: int = 0, *, conn: http.client.HTTPConnection | None = None, release=None) -> None:
        self.url, self.deadline, self.resp, self.file = url, deadline, resp, file
        self.status_code = resp.status if resp is not None else 200
        self.headers = resp.headers if resp is not None else _Headers({"Content-Length": str(file_size)})
        self._conn, self._release_to = conn, release
        self._complete = False

    def expect(self, ok: tuple[int, ...] = (200,)) -> None:
        """Raises TransportError("http") for another status or a Content-Encoding other than identity."""
        expect_status(self, self.url, ok)

    def content_length(self) -> int | None:
        return content_length(self, self.url)

    def _read(self) -> bytes:
        """At most CHUNK bytes, as soon as any arrive; b"" at the end of the body. Raises Broken-worthy errors
        (OSError, HTTPException, ValueError), ConnectionResetError when the body ends before its length."""
        if self.file is not None:
            return self.file.read(CHUNK)
        resp = self.resp
        chunk = resp.read1(CHUNK)
        if not chunk:
            if not resp.chunked and resp.length:
                raise ConnectionResetError("the body ended before its Content-Length")
            self._complete = True
        return chunk

    def body(self) -> Iterator[bytes]:
        """The raw body, exactly as served (no decoding), in chunks. Raises Broken, TransportError (deadline)."""
        deadline = self.deadline
        while True:
            deadline.check()
            try:
                chunk = self._read()
            except _READ_ERRORS as exc:
                deadline.check()
                if self.file is not None:
                    raise Broken(f"read error: {exc}") from None
                if isinstance(exc, TimeoutError):
                    raise Broken(f"no data for {READ_TIMEOUT} s") from None
                raise Broken("connection closed early") from None
            if not chunk:
                deadline.check()  # a watchdog shutdown reads as the end of the body
                return
            deadline.advance(len(chunk))
            yield chunk

    def read_capped(self, cap: int, what: str) -> bytes:
        """The whole body, at most `cap` bytes. Raises TransportError: more than `cap` ("download size"), fewer
        bytes than announced ("truncated"), a broken connection, the deadline."""
        length = self.content_length()
        if length is not None and length > cap:
            raise OversizeError("download size", f"{what}: more than {cap} bytes, expected at most {cap}")
        data = bytearray()
        try:
            for chunk in self.body():
                data += chunk
                if len(data) > cap:
                    raise OversizeError("download size", f"{what}: more than {cap} bytes, expected at most {cap}")
        except Broken as exc:
            raise TransportError("truncated", f"{self.url}: {len(data)} bytes, then {exc}") from None
        if length is not None and len(data) != length:
            raise TransportError("truncated", f"{self.url}: {len(data)} bytes, expected {length} (Content-Length)")
        return bytes(data)

    def _drain(self) -> None:
        """Read a short body (a redirect's) to its end, so that its connection can carry the next request."""
        length = self.resp.length if self.resp is not None else None
        if length is not None and length > DRAIN_CAP:
            return
        got = 0
        try:
            while got <= DRAIN_CAP and (chunk := self._read()):
                got += len(chunk)
        except _READ_ERRORS:
            pass

    def release(self) -> None:
        """Give the connection back (an answer read to its end, on a connection the server keeps open) or
        close it. The file of a file:// answer is closed."""
        conn, self._conn = self._conn, None
        if self.file is not None:
            self.file.close()
        if conn is None:
            return
        resp = self.resp
        reusable = self._complete and not resp.will_close and not self.deadline.fired \
            and self._release_to is not None
        resp.close()
        if reusable:
            self._release_to(conn)
        else:
            conn.close()

    def close(self) -> None:
        try:
            self.deadline.__exit__(None, None, None)
        finally:
            self.release()

    def __enter__(self) -> Reply:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def expect_status(resp, url: str, ok: tuple[int, ...]) -> None:
    if resp.status_code not in ok:
        raise TransportError("http", f"{url}: HTTP {resp.status_code}, expected {' or '.join(map(str, ok))}")
    encoding = resp.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise TransportError("http", f"{url}: Content-Encoding {encoding}, expected identity (none)")


def content_length(resp, url: str) -> int | None:
    value = resp.headers.get("Content-Length")
    if value is None:
        return None
    if not value.strip().isdigit():
        raise TransportError("http", f"{url}: Content-Length {value!r}, expected a number")
    return int(value)


_Key = tuple[str, str, int, "_Proxy | None"]  # scheme, host, port, proxy: the connections a request may use


class Transport:
    """One HTTP session under the rules above. Thread-safe for concurrent requests (the builder downloads
    .debs on several threads); `pool` is the number of idle connections kept per origin, `retries` the number of
    further attempts when a connection cannot be made (refused, no such host, connect timeout)."""

    def __init__(self, limits: Limits | None = None, *, allow_file: bool = False, retries: int = 0,
                 pool: int = 10) -> None:
        self.limits = limits or Limits.from_env()
        self.allow_file = allow_file
        self.retries = retries
        self.pool = pool
        self.headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity", "Accept": "*/*"}
        self._lock = threading.Lock()
        self._idle: dict[_Key, list[http.client.HTTPConnection]] = {}

    def close(self) -> None:
        """Close the idle connections (the transport stays usable)."""
        with self._lock:
            idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn in conns:
                conn.close()

    def __enter__(self) -> Transport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the connection pool

    def _take(self, key: _Key) -> http.client.HTTPConnection | None:
        """The most recently used idle connection of `key` that is still open, or None."""
        while True:
            with self._lock:
                idle = self._idle.get(key)
                if not idle:
                    return None
                conn = idle.pop()
            if not _dropped(conn):
                return conn
            conn.close()

    def _give(self, key: _Key, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            idle = self._idle.setdefault(key, [])
            if len(idle) < self.pool:
                idle.append(conn)
                return
        conn.close()

    def _connection(self, key: _Key, read_timeout: float) -> http.client.HTTPConnection:
        scheme, host, port, proxy = key
        where = (host, port) if proxy is None else (proxy.host, proxy.port)
        conn: http.client.HTTPConnection
        if scheme == "https":
            conn = _HTTPSConnection(*where, timeout=CONNECT_TIMEOUT, context=_tls_context(), blocksize=SEND_BLOCK)
            if proxy is not None:
                conn.set_tunnel(host, port, {"Proxy-Authorization": proxy.auth} if proxy.auth else None)
        else:
            conn = _HTTPConnection(*where, timeout=CONNECT_TIMEOUT, blocksize=SEND_BLOCK)
        conn.read_timeout = read_timeout
        return conn

    # -- one exchange

    def _route(self, url: str) -> tuple[_Key, str, dict[str, str]]:
        """(pool key, request target, headers for the proxy) of `url`. Raises TransportError("http")."""
        parts = urllib.parse.urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in _DEFAULT_PORTS:
            raise TransportError("http", f"{url}: {scheme or 'no'} scheme, expected http or https")
        try:
            explicit = parts.port
        except ValueError:
            raise TransportError("http", f"{url}: invalid port") from None
        host = parts.hostname
        if not host:
            raise TransportError("http", f"{url}: no host")
        port = explicit or _DEFAULT_PORTS[scheme]
        target = urllib.parse.quote(parts.path or "/", safe=_SAFE)
        if parts.query:
            target += "?" + urllib.parse.quote(parts.query, safe=_SAFE)
        proxy = proxy_for(scheme, host, port)
        extra: dict[str, str] = {}
        if proxy is not None and scheme == "http":  # absolute form, to the proxy
            authority = f"[{host}]" if ":" in host else host
            target = f"http://{authority}{f':{explicit}' if explicit else ''}{target}"
            if proxy.auth:
                extra["Proxy-Authorization"] = proxy.auth
        return (scheme, host, port, proxy), target, extra

    def _send(self, deadline: Deadline, method: str, url: str, headers: dict[str, str] | None = None,
              body=None) -> Reply:
        """Send one request and read the answer's head. A GET reuses an idle connection (and retries once on a
        fresh one if the server had closed it meanwhile); an upload always gets a fresh one. Raises
        TransportError ("http", "upload" for a POST, the deadline's)."""
        key, target, extra = self._route(url)
        read_timeout = READ_TIMEOUT if body is None else UPLOAD_READ_TIMEOUT
        check = "upload" if method == "POST" else "http"
        sent = {**self.headers, **extra, **(headers or {})}
        connects = 0
        reuse = body is None
        while True:
            conn = self._take(key) if reuse else None
            reused = conn is not None
            connecting = not reused
            try:
                if conn is None:
                    conn = self._connection(key, read_timeout)
                    deadline.watch(conn)
                    connects += 1
                    conn.connect()
                else:
                    conn.sock.settimeout(read_timeout)
                deadline.watch(conn.sock)
                connecting = False
                deadline.check()
                conn.request(method, target, body=body, headers=sent)
                resp = conn.getresponse()
            except (OSError, http.client.HTTPException, ValueError) as exc:
                if conn is not None:
                    conn.close()
                deadline.check()
                if reused and isinstance(exc, _STALE):
                    reuse = False  # the server closed the idle connection: once more, on a new one
                    continue
                if connecting and connects <= self.retries and not isinstance(exc, ValueError):
                    continue
                reason = _reason(exc, read_timeout)
                if connecting and key[3] is not None and reason.startswith("cannot connect"):
                    reason = f"cannot connect (through the proxy {key[3].host}:{key[3].port}: {exc})"
                raise TransportError(check, f"{url}: {reason}") from None
            except BaseException:  # the deadline, an interrupt: the connection is in an unknown state
                if conn is not None:
                    conn.close()
                raise
            return Reply(url, deadline, resp, conn=conn, release=lambda c, k=key: self._give(k, c))

    def open(self, url: str, headers: dict[str, str] | None = None, *, what: str | None = None,
             size: int | None = None, document: bool = False) -> Reply:
        """The answer for `url` after same-origin redirects (any final status: callers judge it), with its
        deadline armed for `size` expected bytes (`document`: a small signed document's, DOCUMENT_GRACE). Raises
        TransportError("http") when no answer comes, ("redirect refused") for a redirect elsewhere or too many,
        ("download deadline")."""
        what = what or url
        deadline = Deadline("download", what, CHUNK if size is None else size, self.limits,
                            progress=document).__enter__()
        try:
            if url.startswith("file://"):
                return self._open_file(url, deadline)
            first, start = url, origin(url)
            for hop in range(MAX_REDIRECTS + 1):
                reply = self._send(deadline, "GET", url, headers)
                if reply.status_code not in _REDIRECTS:
                    return reply
                location = reply.headers.get("Location", "")
                reply._drain()
                reply.release()
                target = urllib.parse.urljoin(url, location)
                if not location or origin(target) != start or "@" in urllib.parse.urlsplit(target).netloc:
                    raise TransportError("redirect refused", f"{url} redirects to {target or 'nowhere'}, expected "
                                                             f"the same scheme, host and port ({start[0]}://"
                                                             f"{start[1]}:{start[2]})")
                if hop == MAX_REDIRECTS:
                    raise TransportError("redirect refused", f"{first}: more than {MAX_REDIRECTS} redirects")
                url = target
            raise AssertionError("unreachable")
        except BaseException:
            deadline.__exit__(None, None, None)
            raise

    def _open_file(self, url: str, deadline: Deadline) -> Reply:
        if not self.allow_file:
            raise TransportError("http", f"{url}: file:// URLs are not accepted here")
        path = urllib.parse.unquote(urllib.parse.urlsplit(url).path)
        try:
            f = open(path, "rb")
            size = os.fstat(f.fileno()).st_size
        except OSError as exc:
            raise TransportError("http", f"{url}: {exc.strerror}") from None
        return Reply(url, deadline, file=f, file_size=size)

    def get_bytes(self, url: str, cap: int, what: str, size: int | None = None, *, document: bool = False) -> bytes:
        """The whole body of a 200 answer, at most `cap` bytes, within the deadline for `size` bytes (default:
        the cap; `document`: a small signed document's, which follows what arrived). Raises TransportError."""
        with self.open(url, what=what, size=cap if size is None else size, document=document) as reply:
            reply.expect((200,))
            return reply.read_capped(cap, what)

    def get_optional(self, url: str, cap: int, what: str, size: int | None = None, *,
                     document: bool = False) -> bytes | None:
        """`get_bytes` for a file that may rightly be absent: None for an HTTP 404 (its short body read, so the
        connection can carry the next request). Raises TransportError for any other status but 200."""
        with self.open(url, what=what, size=cap if size is None else size, document=document) as reply:
            if reply.status_code == 404:
                reply._drain()
                return None
            reply.expect((200,))
            return reply.read_capped(cap, what)

    def post_file(self, url: str, body: Path, headers: dict[str, str], what: str | None = None) -> tuple[int, bytes]:
        """POST the file `body` (streamed, with its Content-Length); (status, at most REPLY_CAP bytes of the
        answer). Never follows a redirect. The deadline covers sending, the server's checks
        (UPLOAD_SERVER_ALLOWANCE) and the answer. Raises TransportError ("upload", "upload deadline")."""
        size = body.stat().st_size
        what = what or url
        with Deadline("upload", what, size, self.limits, self.limits.upload_allowance) as deadline:
            with open(body, "rb") as f:
                reply = self._send(deadline, "POST", url, {**headers, "Content-Length": str(size)}, body=f)
            try:
                data = bytearray()
                try:
                    for chunk in reply.body():
                        data += chunk
                        if len(data) > REPLY_CAP:
                            break
                except Broken as exc:
                    raise TransportError("upload", f"{url}: HTTP {reply.status_code}, then the answer broke off: "
                                                   f"{exc}") from None
                return reply.status_code, bytes(data[:REPLY_CAP])
            finally:
                reply.release()
