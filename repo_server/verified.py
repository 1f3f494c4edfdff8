"""The current index, as the server may show it: only after index.json.asc verified over the exact bytes of
index.json with the repository's own trust (tmplbuild.repo.chain: signed under the newest root of its chain or an
earlier one, as a publisher reads it; a repository from before roots: its keys/<FPR>.asc), then a strict parse.
An index signed by a key the newest root no longer names is shown, marked `stale` (clients following the root
refuse it until a maintainer re-signs it).

Verifying runs gpg (tens of milliseconds, a few runs per root for the chain), so the result is cached per
process, keyed by the (mtime_ns, size, inode) of both index files and of the root/ directory: any swap
(store.write_index renames new files in) or new root (chain.install renames one into root/) changes the key. A
failure is cached too, so a broken index costs one gpg run per change, not one per request."""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tmplbuild import strictjson
from tmplbuild.errors import TmplbuildError
from tmplbuild.repo import accept
from tmplbuild.repo import index as idx
from tmplbuild.oci import record
from tmplbuild.repo import chain, lookaside, store
from tmplbuild.repo import root as rootdoc
from tmplbuild.repo.root import Root


class IndexUnavailable(Exception):
    """The index cannot be shown: missing, unreadable, or it does not verify. str() is a one-line reason."""


@dataclass(frozen=True)
class Snapshot:
    index: idx.Index
    data: bytes  # the verified bytes of index.json
    doc: dict[str, Any]  # strictjson.loads(data): entries exactly as in index.json, for the API
    root: Root | None = None  # the newest root of the repository's chain (None: a repository without roots)
    stale: str | None = None  # the index was signed by a key the newest root no longer names (chain.carried_over)
    # The images the index names through its manifests, pushed to a registry: (name, version, arch) -> record
    oci: dict[tuple[str, str, str], record.Record] = field(default_factory=dict)

    @property
    def root_expired(self) -> bool:
        return self.root is not None and rootdoc.is_expired(self.root, time.time())

    @property
    def expired(self) -> bool:
        """What every client decides right now (tmplbuild.repo.accept: expired iff now >= expires)."""
        return accept.is_expired(self.index, time.time())


Key = tuple[tuple[int, int, int], ...]


def _stamp(st: os.stat_result) -> tuple[int, int, int]:
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def _root_stamp(root: Path) -> tuple[int, int, int]:
    try:
        return _stamp(os.stat(root / rootdoc.DIRECTORY))
    except OSError:
        return (0, 0, 0)  # no root/: a repository from before roots


def _stat_key(root: Path) -> Key | None:
    try:
        return (_stamp(os.stat(root / store.INDEX)), _stamp(os.stat(root / store.INDEX_SIG)), _root_stamp(root))
    except OSError:
        return None


def _read(path: Path) -> tuple[tuple[int, int, int], bytes]:
    with open(path, "rb") as f:  # the key comes from the very file read, never from an earlier stat
        return _stamp(os.fstat(f.fileno())), f.read()


def verify_pair(root: Path, data: bytes, sig: bytes) -> Snapshot:
    """Verify `sig` over `data` with the repository's trust (chain.repo_trust(root).base_verifier()), then parse.
    Raises TmplbuildError (UsageError: no keys; AuthenticityError: signature, schema, a broken root chain;
    FreshnessError: a root chain that rolls back)."""
    trust = chain.repo_trust(root)
    with trust.base_verifier() as verifier:
        index, _ = accept.verify_and_parse(data, sig, verifier)
        stale = trust.carried_over(verifier)
    return Snapshot(index=index, data=data, doc=strictjson.loads(data, what="index.json", max_depth=idx.MAX_DEPTH),
                    root=trust.root, stale=stale, oci=pushed_images(root, index))


def pushed_images(root: Path, index: idx.Index) -> dict[tuple[str, str, str], record.Record]:
    """The registry records of the index's templates (read from the manifests it hashes; a manifest that does not
    read as signed shows no image)."""
    out = {}
    for entry in index.templates:
        try:
            rec = lookaside.image_record(root, entry)
        except lookaside.Unreadable:
            continue
        if rec is not None and rec.registry is not None:
            out[entry.key] = rec
    return out


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
                read_key = (stamp_data, stamp_sig, _root_stamp(self.root))
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
