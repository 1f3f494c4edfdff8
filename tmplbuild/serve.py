"""`tmplbuild serve`: the repository server (repo_server's Flask app) under gunicorn, a production WSGI server.

gunicorn is embedded through its BaseApplication, with the gthread worker: each of `workers` processes runs a
pool of threads, so many large downloads proceed at once, and a file response goes out with sendfile(2)
(gunicorn does that for `wsgi.file_wrapper` responses, which is what Flask's send_file returns). The app is
created once, in the master, before any worker forks: its start-up checks (repository, token, private key
scan, leftover uploads) run exactly once and fail before anything listens; then, under the repository lock, what
an interrupted publish left served but unlisted is removed (repo_server.app.converge_at_start)."""
from __future__ import annotations

import errno
import socket
import sys
from pathlib import Path
from typing import Any

from tmplbuild.errors import LocalIOError, UsageError

THREADS = 16  # per worker: 8+ concurrent large downloads never wait for each other
DEFAULT_HOST, DEFAULT_PORT, DEFAULT_WORKERS = "127.0.0.1", 8080, 2
DEFAULT_MAX_UPLOAD = 2 << 30


def serve(repo: Path, host: str, port: int, workers: int, token_file: Path | None, max_upload: int) -> None:
    """Serve `repo` on host:port until SIGTERM/SIGINT. Port 0 picks a free port (printed). Raises UsageError
    (no repository, bad token file or option: exit 2), UnsafeContentError (private key material in the
    repository: exit 6), LocalIOError (address in use or not available: exit 7)."""
    from repo_server import create_app

    if workers < 1:
        raise UsageError("workers", f"found {workers}, expected at least 1")
    if not 0 <= port <= 65535:
        raise UsageError("port", f"found {port}, expected 0-65535")
    config = {"REPO": str(repo), "TOKEN_FILE": str(token_file) if token_file else None, "MAX_UPLOAD": max_upload}
    app = create_app(config)
    listener = _bind(host, port)
    bound = listener.getsockname()[1]
    uploads = "enabled" if app.extensions["tmplbuild"].token is not None else "disabled"
    shown = f"[{host}]" if ":" in host else host
    print(f"serving {repo} on http://{shown}:{bound}, uploads {uploads}", flush=True)
    options = gunicorn_options(repo, workers, listener.detach())  # gunicorn takes over that descriptor
    try:
        _Gunicorn(app, options).run()
    except SystemExit as exc:  # gunicorn's arbiter ends with sys.exit
        if exc.code not in (0, None):
            raise LocalIOError("serve", f"the server stopped with status {exc.code} (see the lines above)") from None


def gunicorn_options(repo: Path, workers: int, fd: int) -> dict[str, Any]:
    """gunicorn settings for serving on the already bound socket `fd`."""
    return {
        "bind": [f"fd://{fd}"],
        "workers": workers,
        "worker_class": "gthread",
        "threads": THREADS,
        "worker_connections": 1000,
        # No "sendfile" key: gunicorn's cfg.sendfile is False whenever that setting is given at all (it is the
        # --no-sendfile switch), so setting it to True would turn sendfile off. Unset means on.
        "keepalive": 5,
        "timeout": 60,  # a worker silent this long is restarted; gthread's main loop answers while threads send
        "graceful_timeout": 10,
        "loglevel": "warning",
        "errorlog": "-",
        "accesslog": None,  # no per-request lines (and never the Authorization header)
        "control_socket_disable": True,
        "proc_name": f"tmplbuild-serve {repo}",
    }


def parse_size(text: str) -> int:
    """`2G`, `500M`, `64K`, `1048576` → bytes (binary units). Raises UsageError."""
    import re

    m = re.fullmatch(r"(\d+)\s*([KMGT]?)(?:i?B)?", text.strip(), re.I)
    if not m or int(m.group(1)) == 0:
        raise UsageError("size", f"found {text!r}, expected a number of bytes, optionally with K, M, G or T")
    return int(m.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30, "T": 40}[m.group(2).upper()]


def _bind(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise UsageError("host", f"{host}: {exc.strerror}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise LocalIOError("bind", f"{host}:{port}: address already in use (another server on this port?)") from None
        raise LocalIOError("bind", f"{host}:{port}: {exc.strerror}") from None
    return sock


def _gunicorn_base() -> type:
    try:
        from gunicorn.app.base import BaseApplication
    except ImportError:
        raise UsageError("serve", "gunicorn is not installed (pip install gunicorn)") from None
    return BaseApplication


class _Gunicorn(_gunicorn_base()):  # type: ignore[misc]
    def __init__(self, app: Any, options: dict[str, Any]) -> None:
        self.application = app
        self.options = options
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.options.items():
            if key in self.cfg.settings:  # control_socket_disable exists from gunicorn 25.1 on
                self.cfg.set(key, value)

    def load(self) -> Any:
        return self.application


if __name__ == "__main__":  # pragma: no cover - `python -m tmplbuild serve` is the way in
    sys.exit("use: tmplbuild serve REPO")
