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
"""
from __future__ import annotations

import http.client
import os
import re
import socket
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import requests
import requests.adapters
import urllib3
import urllib3.connectionpool
import urllib3.poolmanager

from tmplbuild import __version__
from tmplbuild.errors import TransportError, UsageError

USER_AGENT = f"tmplbuild/{__version__}"
CONNECT_TIMEOUT = 10  # seconds to connect
READ_TIMEOUT = 30  # seconds between two bytes of an answer
UPLOAD_READ_TIMEOUT = 300  # seconds a server may take to check an upload before it answers
TIMEOUT = (CONNECT_TIMEOUT, READ_TIMEOUT)
MAX_REDIRECTS = 3
CHUNK = 1 << 20
DEFAULT_DEADLINE_BASE = 30.0  # seconds every request gets on top of its size at the minimum rate
DEFAULT_MIN_RATE = 256 << 10  # bytes/s (2 Mbit/s): slower than this on average, a download is given up
UPLOAD_SERVER_ALLOWANCE = 120.0  # seconds added to an upload's deadline: the server waits up to this for its lock
REPLY_CAP = 64 << 10  # bytes of an upload's JSON answer
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


_local = threading.local()  # the Deadline of the request this thread is making, for the connection pools


class Deadline:
    """The overall time allowed for one request and its body. Armed as a context manager: a timer then shuts
    down the sockets the request uses when the time is up."""

    def __init__(self, kind: str, what: str, size: int, limits: Limits, extra: float = 0.0) -> None:
        self.kind, self.what, self.limits, self.extra = kind, what, limits, extra
        self.start = time.monotonic()
        self.size = size
        self.allowed = limits.allowance(size, extra)
        self.fired = False
        self._lock = threading.Lock()
        self._conns: list[object] = []
        self._timer: threading.Timer | None = None
        self._active = False

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
            self.allowed = self.limits.allowance(size, self.extra)
            if self._active:
                self._arm()

    def check(self) -> None:
        if self.expired:
            raise self.error()

    def error(self) -> TransportError:
        elapsed = time.monotonic() - self.start
        extra = f" + {self.extra:g} s for the server" if self.extra else ""
        env = f"{ENV_BASE}, {ENV_RATE}" + (f", {ENV_UPLOAD}" if self.extra else "")
        return TransportError(f"{self.kind} deadline", (
            f"{self.what}: {elapsed:.0f} s passed, allowed {self.allowed:.0f} s ({self.limits.base:g} s{extra} + "
            f"{self.size} bytes at {self.limits.min_rate} bytes/s; {env} change this)"))

    def watch(self, conn: object) -> None:
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
    sock = getattr(conn, "sock", None)
    if sock is None:
        return
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)  # the plain socket's: no TLS state is touched
    except (OSError, TypeError):
        pass


# -- connection pools that report their connections to the current deadline ------------------------------------

def _watched(conn):
    deadline = getattr(_local, "deadline", None)
    if deadline is not None:
        deadline.watch(conn)
    return conn


class _HTTPPool(urllib3.connectionpool.HTTPConnectionPool):
    def _get_conn(self, timeout=None):
        return _watched(super()._get_conn(timeout))


class _HTTPSPool(urllib3.connectionpool.HTTPSConnectionPool):
    def _get_conn(self, timeout=None):
        return _watched(super()._get_conn(timeout))


_POOLS = {"http": _HTTPPool, "https": _HTTPSPool}


class _Adapter(requests.adapters.HTTPAdapter):
    def init_poolmanager(self, *args, **kwargs) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = _POOLS

    def proxy_manager_for(self, proxy, **kwargs):
        manager = super().proxy_manager_for(proxy, **kwargs)
        manager.pool_classes_by_scheme = _POOLS
        return manager


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
    if isinstance(exc, (requests.Timeout, urllib3.exceptions.TimeoutError, TimeoutError)):
        return f"timed out (connect {CONNECT_TIMEOUT} s, read {read_timeout:g} s)"
    if isinstance(exc, requests.ConnectionError):
        return "cannot connect" if "connect" in str(exc).lower() else f"connection failed: {exc}"
    return f"{type(exc).__name__}: {exc}"


class Broken(Exception):
    """The connection broke (or a read timed out) before the end of the body."""


_READ_ERRORS = (urllib3.exceptions.HTTPError, http.client.HTTPException, OSError, ValueError)


class Reply:
    """One answer: status, headers and a raw body read under the request's deadline. A context manager; closing
    it closes the connection and disarms the deadline."""

    def __init__(self, url: str, deadline: Deadline, resp: requests.Response | None = None, file=None,
                 file_size: int = 0) -> None:
        self.url, self.deadline, self.resp, self.file = url, deadline, resp, file
        self.status_code = resp.status_code if resp is not None else 200
        self.headers = resp.headers if resp is not None else requests.structures.CaseInsensitiveDict(
            {"Content-Length": str(file_size)})

    def expect(self, ok: tuple[int, ...] = (200,)) -> None:
        """Raises TransportError("http") for another status or a Content-Encoding other than identity."""
        expect_status(self, self.url, ok)

    def content_length(self) -> int | None:
        return content_length(self, self.url)

    def body(self) -> Iterator[bytes]:
        """The raw body, exactly as served (no decoding), in chunks. Raises Broken, TransportError (deadline)."""
        deadline = self.deadline
        while True:
            deadline.check()
            try:
                if self.file is not None:
                    chunk = self.file.read(CHUNK)
                else:
                    chunk = self.resp.raw.read1(CHUNK, decode_content=False) if hasattr(self.resp.raw, "read1") \
                        else self.resp.raw.read(CHUNK, decode_content=False)
            except _READ_ERRORS as exc:
                deadline.check()
                if self.file is not None:
                    raise Broken(f"read error: {exc}") from None
                if isinstance(exc, (urllib3.exceptions.TimeoutError, TimeoutError)):
                    raise Broken(f"no data for {READ_TIMEOUT} s") from None
                raise Broken("connection closed early") from None
            if not chunk:
                deadline.check()  # a watchdog shutdown reads as the end of the body
                return
            yield chunk

    def read_capped(self, cap: int, what: str) -> bytes:
        """The whole body, at most `cap` bytes. Raises TransportError: more than `cap` ("download size"), fewer
        bytes than announced ("truncated"), a broken connection, the deadline."""
        length = self.content_length()
        if length is not None and length > cap:
            raise TransportError("download size", f"{what}: more than {cap} bytes, expected at most {cap}")
        data = bytearray()
        try:
            for chunk in self.body():
                data += chunk
                if len(data) > cap:
                    raise TransportError("download size", f"{what}: more than {cap} bytes, expected at most {cap}")
        except Broken as exc:
            raise TransportError("truncated", f"{self.url}: {len(data)} bytes, then {exc}") from None
        if length is not None and len(data) != length:
            raise TransportError("truncated", f"{self.url}: {len(data)} bytes, expected {length} (Content-Length)")
        return bytes(data)

    def close(self) -> None:
        try:
            if self.resp is not None:
                self.resp.close()
            if self.file is not None:
                self.file.close()
        finally:
            self.deadline.__exit__(None, None, None)

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


class Transport:
    """One HTTP session under the rules above. Thread-safe for concurrent requests (the builder downloads
    .debs on several threads); `pool` is the number of connections kept per host."""

    def __init__(self, limits: Limits | None = None, *, allow_file: bool = False, retries: int = 0,
                 pool: int = 10) -> None:
        self.limits = limits or Limits.from_env()
        self.allow_file = allow_file
        self.session = requests.Session()
        adapter = _Adapter(pool_connections=pool, pool_maxsize=pool, max_retries=retries)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self.session.headers.update({"User-Agent": USER_AGENT, "Accept-Encoding": "identity"})

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> Transport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, deadline: Deadline, method: str, url: str, **kwargs) -> requests.Response:
        _local.deadline = deadline
        try:
            return self.session.request(method, url, allow_redirects=False, **kwargs)
        except (requests.RequestException, urllib3.exceptions.HTTPError, OSError, ValueError) as exc:
            deadline.check()
            if not isinstance(exc, requests.RequestException):
                raise TransportError("http", f"{url}: {_reason(exc)}") from None
            check = "upload" if method == "POST" else "http"
            raise TransportError(check, f"{url}: {_reason(exc, kwargs['timeout'][1])}") from None
        finally:
            _local.deadline = None

    def open(self, url: str, headers: dict[str, str] | None = None, *, what: str | None = None,
             size: int | None = None) -> Reply:
        """The answer for `url` after same-origin redirects (any final status: callers judge it), with its
        deadline armed for `size` expected bytes. Raises TransportError("http") when no answer comes,
        ("redirect refused") for a redirect elsewhere or too many, ("download deadline")."""
        what = what or url
        deadline = Deadline("download", what, CHUNK if size is None else size, self.limits).__enter__()
        try:
            if url.startswith("file://"):
                return self._open_file(url, deadline)
            first, start = url, origin(url)
            for hop in range(MAX_REDIRECTS + 1):
                resp = self._request(deadline, "GET", url, headers=headers, stream=True, timeout=TIMEOUT)
                if resp.status_code not in _REDIRECTS:
                    return Reply(url, deadline, resp)
                location = resp.headers.get("Location", "")
                resp.close()
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

    def get_bytes(self, url: str, cap: int, what: str, size: int | None = None) -> bytes:
        """The whole body of a 200 answer, at most `cap` bytes, within the deadline for `size` bytes (default:
        the cap). Raises TransportError."""
        with self.open(url, what=what, size=cap if size is None else size) as reply:
            reply.expect((200,))
            return reply.read_capped(cap, what)

    def post_file(self, url: str, body: Path, headers: dict[str, str], what: str | None = None) -> tuple[int, bytes]:
        """POST the file `body`; (status, at most REPLY_CAP bytes of the answer). Never follows a redirect. The
        deadline covers sending, the server's checks (UPLOAD_SERVER_ALLOWANCE) and the answer. Raises
        TransportError ("upload", "upload deadline")."""
        size = body.stat().st_size
        what = what or url
        with Deadline("upload", what, size, self.limits, self.limits.upload_allowance) as deadline:
            with open(body, "rb") as f:
                resp = self._request(deadline, "POST", url, data=f, stream=True,
                                     timeout=(CONNECT_TIMEOUT, UPLOAD_READ_TIMEOUT),
                                     headers={**headers, "Content-Length": str(size)})
            reply = Reply(url, deadline, resp)
            try:
                data = bytearray()
                try:
                    for chunk in reply.body():
                        data += chunk
                        if len(data) > REPLY_CAP:
                            break
                except Broken as exc:
                    raise TransportError("upload", f"{url}: HTTP {resp.status_code}, then the answer broke off: "
                                                   f"{exc}") from None
                return resp.status_code, bytes(data[:REPLY_CAP])
            finally:
                if reply.resp is not None:
                    reply.resp.close()
