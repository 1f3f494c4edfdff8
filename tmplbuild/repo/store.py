"""The repository directory: its layout, its lock, and the one way the index pair is replaced.

index.json and index.json.asc are two files, and two renames cannot be one atomic step. So a new pair is
written to .pending/ (fsynced) first and only then renamed into place; whoever takes the lock next finishes
an interrupted swap (roll forward) or discards a pending pair that was never complete. Dot-paths are never
served, so .pending, .staging-* and .lock are invisible to clients."""
from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tmplbuild.files import exclusive_lock, fsync_path
from tmplbuild.errors import LocalIOError, UsageError
from tmplbuild.repo import index as idx

FPR = re.compile(r"\A[0-9A-F]{40}\Z")
INDEX, INDEX_SIG = "index.json", "index.json.asc"
PENDING = ".pending"
COMPLETE = "COMPLETE"  # marker written last into .pending: the pair there is whole and verified


@dataclass(frozen=True)
class RepoKeys:
    public_keys: bytes  # every keys/<FPR>.asc, concatenated
    fingerprints: tuple[str, ...]


def read_keys(root: Path) -> RepoKeys:
    """The repository's own pinned keys: keys/<FINGERPRINT>.asc. Raises UsageError when there are none."""
    files = sorted(p for p in (root / "keys").glob("*.asc") if FPR.match(p.stem))
    if not files:
        raise UsageError("repository", f"{root}: no keys/<FINGERPRINT>.asc; run `tmplbuild repo init` first")
    return RepoKeys(b"".join(p.read_bytes() for p in files), tuple(p.stem for p in files))


@contextmanager
def locked(root: Path, timeout: float = 120.0) -> Iterator[None]:
    """Exclusive lock on the repository for one publisher; waits up to `timeout`, then LocalIOError (exit 7).
    Finishes or discards an interrupted index swap before yielding."""
    try:
        fd = os.open(root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise LocalIOError("lock", f"{root / '.lock'}: {exc.strerror}") from None
    try:
        with exclusive_lock(fd, timeout, "lock", f"{root}: another publisher holds the lock"):
            recover(root)
            yield
    finally:
        os.close(fd)


def recover(root: Path) -> None:
    pending = root / PENDING
    if pending.is_dir():
        if (pending / COMPLETE).exists():
            _swap(root)
        else:
            shutil.rmtree(pending)
    for stale in root.glob("templates/*/*/.*.part"):  # a publish killed before its renames
        stale.unlink(missing_ok=True)


def write_index(root: Path, data: bytes, signature: bytes) -> None:
    """Replace the index pair. Call with the lock held, after the signature was verified."""
    pending = root / PENDING
    shutil.rmtree(pending, ignore_errors=True)
    pending.mkdir()
    for name, content in ((INDEX, data), (INDEX_SIG, signature), (COMPLETE, b"")):
        write_durable(pending / name, content)
    fsync_dir(pending)
    _swap(root)


def _swap(root: Path) -> None:
    pending = root / PENDING
    # The signature first: a reader between the two renames gets a pair that does not verify and retries,
    # never an unsigned new index.
    for name in (INDEX_SIG, INDEX):
        if (pending / name).exists():
            os.replace(pending / name, root / name)
    fsync_dir(root)
    shutil.rmtree(pending)


def write_durable(path: Path, data: bytes) -> None:
    try:
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        raise LocalIOError("write", f"{path}: {exc.strerror}") from None


def fsync_dir(path: Path) -> None:
    fsync_path(path, directory=True)


def load_index(root: Path, verifier) -> tuple[idx.Index, bytes]:
    """The current index, after its signature over the exact bytes was verified, then parsed. Raises
    UsageError (no index), AuthenticityError (signature, schema)."""
    try:
        data = (root / INDEX).read_bytes()
        sig = (root / INDEX_SIG).read_bytes()
    except FileNotFoundError:
        raise UsageError("repository", f"{root}: no {INDEX}; run `tmplbuild repo init` first") from None
    verifier.verify(data, sig)
    return idx.parse(data), data
