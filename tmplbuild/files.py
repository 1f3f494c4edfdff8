"""Small file helpers shared by the builder, the repository, the server and the client."""
from __future__ import annotations

import fcntl
import os
import hashlib
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tmplbuild.errors import LocalIOError

CHUNK = 1 << 20


class Writeback:
    """Gets a file that is being written onto the disk while it is written: after every `every` bytes, a
    background thread runs fdatasync, so the fsync that must precede the file's rename into place waits for
    the last few megabytes only, not for the whole file (a 53 MB template: about 0.1 s of a slow disk).
    Durability is unchanged: the caller still fsyncs before renaming. Raises nothing; call `close()`."""

    def __init__(self, fd: int, every: int = 8 << 20) -> None:
        self.fd, self.every = fd, every
        self._pending = 0
        self._thread: threading.Thread | None = None

    def wrote(self, n: int) -> None:
        self._pending += n
        if self._pending >= self.every and (self._thread is None or not self._thread.is_alive()):
            self._pending = 0
            self._thread = threading.Thread(target=self._sync, daemon=True)
            self._thread.start()

    def _sync(self) -> None:
        try:
            os.fdatasync(self.fd)
        except OSError:
            pass  # the caller's own fsync reports any error

    def close(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None


def hash_file(path: Path) -> tuple[int, str, str]:
    """(size, sha256, sha512) of a file, in one pass."""
    h256, h512, size = hashlib.sha256(), hashlib.sha512(), 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h256.update(chunk)
            h512.update(chunk)
            size += len(chunk)
    return size, h256.hexdigest(), h512.hexdigest()


def sha256_file(path: Path) -> str:
    """sha256 of a file alone (hash_file's sha512 is half its time): a .deb against its Packages entry, a base
    file against a delta's signed base."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


@contextmanager
def exclusive_lock(fd: int, timeout: float, check: str, held: str) -> Iterator[None]:
    """flock(LOCK_EX) on an open fd, waiting up to `timeout` seconds. Raises LocalIOError(check, held) (exit 7)
    when another process keeps it. The caller owns (and closes) the fd."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise LocalIOError(check, held) from None
            time.sleep(0.05)
    try:
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)


def make_dirs(path: Path, mode: int = 0o755, check: str = "mkdir") -> list[Path]:
    """`mkdir -p path`, each directory it creates with exactly `mode` (not filtered by the umask). Returns the
    directories it created, outermost first (none when `path` is already a directory). Raises
    LocalIOError(check, ...)."""
    missing: list[Path] = []
    p = path
    while not os.path.lexists(p) and p != p.parent:
        missing.append(p)
        p = p.parent
    created: list[Path] = []
    for d in reversed(missing):
        try:
            d.mkdir(mode)
        except FileExistsError:
            if d.is_dir():  # made by someone else meanwhile
                continue
            raise LocalIOError(check, f"cannot create {d}: it exists and is not a directory") from None
        except OSError as exc:
            raise LocalIOError(check, f"cannot create {d}: {exc.strerror}") from None
        created.append(d)
        os.chmod(d, mode)
    if not path.is_dir():
        raise LocalIOError(check, f"{path}: not a directory")
    return created


def remove_empty_dirs(created: list[Path]) -> None:
    """Undo make_dirs where nothing was put inside: rmdir innermost first, stopping at the first that is not
    empty."""
    for d in reversed(created):
        try:
            d.rmdir()
        except OSError:
            return


def fsync_path(path: Path, directory: bool = False) -> None:
    """fsync a file, or a directory (so that a rename into it survives a crash)."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, *, mode: int = 0o644, durable: bool = False, check: str = "write") -> None:
    """Replace `path` with `data` so that a reader sees the old content or the new, never a part: a hidden
    temporary file in the same directory, then os.replace. `durable` also fsyncs the file before the rename and
    the directory after it (configuration and state that must survive a crash; caches need not). Raises
    LocalIOError(check, ...)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                if durable:
                    f.flush()
                    os.fsync(f.fileno())
            os.chmod(tmp, mode)  # O_CREAT's mode is filtered by the umask
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        if durable:
            fsync_path(path.parent, directory=True)
    except OSError as exc:
        raise LocalIOError(check, f"{path}: {exc.strerror}") from None
