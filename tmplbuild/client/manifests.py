"""A template's manifest as the client reads it: the bytes the signed index hashes, kept in a content-addressed
cache under the client state directory (`manifests/<sha256>`), so `affected` and `show` over many template
versions download each manifest once. A cached file is used only when its size and sha256 are the index's; a
downloaded one is checked before it is cached or parsed. Nothing is answered from bytes whose hash was not
checked."""
from __future__ import annotations

import hashlib
from pathlib import Path

from tmplbuild.errors import AuthenticityError, LocalIOError
from tmplbuild.files import atomic_write
from tmplbuild.manifest import Manifest, ManifestError
from tmplbuild.manifest import parse as parse_manifest
from tmplbuild.repo import index as idx
from tmplbuild.transport import Transport


def cache_dir() -> Path:
    from tmplbuild.client import state

    return state.state_dir() / "manifests"


def cached(ref: idx.FileRef) -> bytes | None:
    """The cached bytes of `ref` when they are exactly the signed ones, else None."""
    try:
        data = (cache_dir() / ref.sha256).read_bytes()
    except OSError:
        return None
    return data if len(data) == ref.size and hashlib.sha256(data).hexdigest() == ref.sha256 else None


def check(ref: idx.FileRef, data: bytes) -> None:
    """Raises AuthenticityError("manifest") unless `data` has the signed size and sha256."""
    got = hashlib.sha256(data).hexdigest()
    if (len(data), got) != (ref.size, ref.sha256):
        raise AuthenticityError("manifest", f"{ref.path}: size/sha256 {len(data)}/{got[:16]}…, the index says "
                                            f"{ref.size}/{ref.sha256[:16]}…")


def parse(entry: idx.Entry, data: bytes) -> Manifest:
    """The manifest of `entry` from checked bytes. Raises AuthenticityError("manifest") when they do not parse or
    name another template."""
    try:
        m = parse_manifest(data)
    except ManifestError as exc:
        raise AuthenticityError("manifest", f"{entry.manifest.path}: {exc}") from None
    if m.key != entry.key:
        raise AuthenticityError("manifest", f"{entry.manifest.path}: names {' '.join(m.key)}, the index entry "
                                            f"{' '.join(entry.key)}")
    return m


def verified_bytes(transport: Transport, base: str, ref: idx.FileRef, *, use_cache: bool = True) -> bytes:
    """The signed bytes of the manifest `ref`: from the cache, else downloaded (capped at the signed size),
    checked, then cached. Raises AuthenticityError, TransportError (LocalIOError never: a cache that cannot be
    written is only slower)."""
    if use_cache and (data := cached(ref)) is not None:
        return data
    data = transport.get_bytes(f"{base}/{ref.path}", ref.size, ref.path.rsplit("/", 1)[-1], document=True)
    check(ref, data)
    if use_cache:
        try:
            atomic_write(cache_dir() / ref.sha256, data, mode=0o644)
        except LocalIOError:
            pass
    return data


def verified_manifest(transport: Transport, base: str, entry: idx.Entry, *, use_cache: bool = True) -> Manifest:
    """The manifest the signed index hashes for `entry`. Raises AuthenticityError, TransportError."""
    return parse(entry, verified_bytes(transport, base, entry.manifest, use_cache=use_cache))
