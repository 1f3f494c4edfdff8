"""The repository directory: its layout, its lock, and the one way the index pair is replaced.

index.json and index.json.asc are two files, and two renames cannot be one atomic step. So a new pair is
written to .pending/ (fsynced) first and only then renamed into place; whoever takes the lock next finishes
an interrupted swap (roll forward) or discards a pending pair that was never complete. Dot-paths are never
served, so .pending, .staging-* and .lock are invisible to clients.
What a publish that died between its renames and the index swap leaves behind is removed by
tmplbuild.repo.converge, under this same lock."""
from __future__ import annotations

import errno
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
from tmplbuild.repo import sums

FPR = re.compile(r"\A[0-9A-F]{40}\Z")
INDEX, INDEX_SIG = "index.json", "index.json.asc"
PENDING = ".pending"
COMPLETE = "COMPLETE"  # marker written last into .pending: the pair there is whole and verified
TEMPLATES = "templates"
SUMS, SUMS_SIG = sums.NAME, sums.SIG
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


@dataclass(frozen=True)
class RepoKeys:
    public_keys: bytes  # every keys/<FPR>.asc, concatenated
    fingerprints: tuple[str, ...]


def key_files(root: Path) -> list[Path]:
    """The repository's key files, keys/<FINGERPRINT>.asc, sorted (other names in keys/ are not keys)."""
    return sorted(p for p in (root / "keys").glob("*.asc") if FPR.match(p.stem))


def read_keys(root: Path) -> RepoKeys:
    """The repository's own pinned keys: keys/<FINGERPRINT>.asc. Raises UsageError when there are none."""
    files = key_files(root)
    if not files:
        raise UsageError("repository", f"{root}: no keys/<FINGERPRINT>.asc; run `tmplbuild repo init` first")
    return RepoKeys(b"".join(p.read_bytes() for p in files), tuple(p.stem for p in files))


def io_error(check: str, path: Path | str, exc: OSError) -> LocalIOError:
    """LocalIOError (exit 7) for an OSError, keeping its errno (`disk_full` reads it)."""
    error = LocalIOError(check, f"{path}: {exc.strerror or exc}")
    error.errno = exc.errno  # type: ignore[attr-defined]
    return error


def disk_full(exc: BaseException) -> bool:
    """The error is ENOSPC or EDQUOT (an OSError, or a LocalIOError made by io_error)."""
    return getattr(exc, "errno", None) in DISK_FULL


@contextmanager
def locked(root: Path, timeout: float = 120.0) -> Iterator[list[str]]:
    """Exclusive lock on the repository for one publisher; waits up to `timeout`, then LocalIOError (exit 7).
    Finishes or discards an interrupted index swap before yielding; yields what that did (one line each)."""
    try:
        fd = os.open(root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise LocalIOError("lock", f"{root / '.lock'}: {exc.strerror}") from None
    try:
        with exclusive_lock(fd, timeout, "lock", f"{root}: another publisher holds the lock"):
            yield recover(root)
    finally:
        os.close(fd)


def recover(root: Path) -> list[str]:
    """Finish (complete pair) or discard (incomplete) an interrupted index swap, and drop the .part files of a
    publish killed before its renames. Call with the lock held. Returns what it did, one line each."""
    done = []
    pending = root / PENDING
    if pending.is_dir():
        if (pending / COMPLETE).exists():
            _swap(root)
            done.append(f"finished the interrupted index swap in {PENDING}/")
        else:
            shutil.rmtree(pending, ignore_errors=True)
            done.append(f"removed {PENDING}/, an index pair that was never complete")
    for stale in sorted(root.glob("templates/*/*/.*.part")):
        stale.unlink(missing_ok=True)
        done.append(f"removed {stale.relative_to(root).as_posix()}")
    return done


def write_index(root: Path, data: bytes, signature: bytes) -> None:
    """Replace the index pair. Call with the lock held, after the signature was verified. When the pair cannot
    be written whole (a full disk), .pending is removed again and the previous pair stays in place; once the
    swap has begun, a failure leaves it for `recover` to finish."""
    pending = root / PENDING
    try:
        shutil.rmtree(pending, ignore_errors=True)
        pending.mkdir()
        for name, content in ((INDEX, data), (INDEX_SIG, signature), (COMPLETE, b"")):
            write_durable(pending / name, content)
        fsync_dir(pending)
    except OSError as exc:
        shutil.rmtree(pending, ignore_errors=True)
        raise io_error("write", pending, exc) from None
    except BaseException:
        shutil.rmtree(pending, ignore_errors=True)
        raise
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
        raise io_error("write", path, exc) from None


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
