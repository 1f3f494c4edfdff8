"""The current index, as the server may show it: only after index.json.asc verified over the exact bytes of
index.json with the repository's pinned keys (keys/<FPR>.asc), then a strict parse.

Verifying runs gpg (tens of milliseconds), so the result is cached per process, keyed by the (mtime_ns, size,
inode) of both index files: any swap (store.write_index renames new files in) changes the key. A failure is
cached too, so a broken index costs one gpg run per change, not one per request."""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tmplbuild import strictjson
from tmplbuild.errors import TmplbuildError
from tmplbuild.repo import accept
from tmplbuild.repo import index as idx
from tmplbuild.repo import store
from tmplbuild.sign import Verifier


class IndexUnavailable(Exception):
    """The index cannot be shown: missing, unreadable, or it does not verify. str() is a one-line reason."""


@dataclass(frozen=True)
class Snapshot:
    index: idx.Index
    data: bytes  # the verified bytes of index.json
    doc: dict[str, Any]  # strictjson.loads(data): entries exactly as in index.json, for the API

    @property
    def expired(self) -> bool:
        """What every client decides right now (tmplbuild.repo.accept: expired iff now >= expires)."""
        return accept.is_expired(self.index, time.time())


Key = tuple[tuple[int, int, int], tuple[int, int, int]]


def _stamp(st: os.stat_result) -> tuple[int, int, int]:
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def _stat_key(root: Path) -> Key | None:
    try:
        return (_stamp(os.stat(root / store.INDEX)), _stamp(os.stat(root / store.INDEX_SIG)))
    except OSError:
        return None


def _read(path: Path) -> tuple[tuple[int, int, int], bytes]:
    with open(path, "rb") as f:  # the key comes from the very file read, never from an earlier stat
        return _stamp(os.fstat(f.fileno())), f.read()


def verify_pair(root: Path, data: bytes, sig: bytes) -> Snapshot:
    """Verify `sig` over `data` with the repository's pinned keys, then parse. Raises TmplbuildError
    (UsageError: no keys; AuthenticityError: signature or schema)."""
    keys = store.read_keys(root)
    with Verifier(keys.public_keys, keys.fingerprints) as verifier:
        index, _ = accept.verify_and_parse(data, sig, verifier)
    return Snapshot(index=index, data=data, doc=strictjson.loads(data, what="index.json", max_depth=idx.MAX_DEPTH))


class IndexCache:
    """Thread-safe per-process cache of the verified current index."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._lock = threading.Lock()
        self._key: Key | None = None
        self._value: Snapshot | IndexUnavailable | None = None

    def get(self) -> Snapshot:
        """The verified current index. Raises IndexUnavailable."""
        key = _stat_key(self.root)
        value = self._value
        if key is None or key != self._key or value is None:
            with self._lock:  # one gpg run per change, however many requests arrive meanwhile
                value = self._refresh()
        if isinstance(value, IndexUnavailable):
            raise value
        return value

    def _refresh(self) -> Snapshot | IndexUnavailable:
        for attempt in range(3):
            key = _stat_key(self.root)
            if key is not None and key == self._key and self._value is not None:
                return self._value
            try:
                stamp_data, data = _read(self.root / store.INDEX)
                stamp_sig, sig = _read(self.root / store.INDEX_SIG)
            except FileNotFoundError as exc:
                result: Snapshot | IndexUnavailable = IndexUnavailable(
                    f"no {Path(exc.filename).name} in the repository")
                read_key = None
            except OSError as exc:
                result, read_key = IndexUnavailable(f"cannot read the index: {exc.strerror}"), None
            else:
                read_key = (stamp_data, stamp_sig)
                try:
                    result = verify_pair(self.root, data, sig)
                except TmplbuildError as exc:
                    result = IndexUnavailable(f"index.json does not verify: {exc}")
            # A publisher renames the signature first, then the index: a pair read between the two renames
            # does not verify. If the files changed while we read them, read again (briefly) before failing.
            if isinstance(result, IndexUnavailable) and _stat_key(self.root) != read_key and attempt < 2:
                time.sleep(0.05)
                continue
            self._key, self._value = read_key, result
            return result
        raise AssertionError("unreachable")
