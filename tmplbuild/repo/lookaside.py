"""The repository's lookaside tree, `sigstore/`: the "simple signing" signatures of the OCI images a publish
pushed, where stock skopeo and podman look for them (registries.d `lookaside:` pointing at `<repository URL>/sigstore`).

The index lists them through the template manifests it hashes (the manifest's `oci.registry.signatures`,
tmplbuild.oci.record), so convergence, `repo verify`, prune and remove know them as they know template files.
Reads the repository directory; the caller holds the lock where it writes."""
from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

from tmplbuild.errors import AuthenticityError
from tmplbuild.oci import record, simplesign
from tmplbuild.repo import index as idx

DIRECTORY = "sigstore"


class Unreadable(Exception):
    """A listed manifest that is missing, differs from its signed sha256 or does not parse."""


def image_record(root: Path, entry: idx.Entry) -> record.Record | None:
    """The OCI record `entry`'s manifest holds (None: the template has no image). Raises Unreadable."""
    try:
        data = (root / entry.manifest.path).read_bytes()
    except OSError as exc:
        raise Unreadable(f"{entry.manifest.path}: {exc.strerror}") from None
    if hashlib.sha256(data).hexdigest() != entry.manifest.sha256:
        raise Unreadable(f"{entry.manifest.path}: not the manifest the index signs")
    try:
        return record.in_manifest(data)
    except ValueError as exc:
        raise Unreadable(f"{entry.manifest.path}: {exc}") from None


def signatures_of(root: Path, entry: idx.Entry) -> list[record.Signature] | None:
    """The lookaside files `entry`'s manifest lists ([] for an image never pushed, or no image); None when the
    manifest is Unreadable: then nobody can tell what is listed."""
    try:
        rec = image_record(root, entry)
    except Unreadable:
        return None
    return list(rec.registry.signatures) if rec is not None and rec.registry is not None else []


def listed(root: Path, entries: Iterable[idx.Entry]) -> dict[str, record.Signature] | None:
    """Every lookaside file an index with `entries` lists, by path; None when any listed manifest cannot be read as signed (see
    signatures_of): then nothing under sigstore/ may be taken for a leftover.

    A moving tag's signature (latest-<arch>) is listed for the newest version of its line only: once a newer
    version is published, the older image's moving-tag signature goes (convergence removes it), so a registry that
    points the moving tag back at the older image fails skopeo's signature check. Its version tag keeps its own."""
    entries = tuple(entries)
    newest = {}
    for entry in entries:  # by created, then version: what `fetch` takes as the newest
        line = (entry.name, entry.arch)
        if line not in newest or (entry.created, entry.version) > (newest[line].created, newest[line].version):
            newest[line] = entry
    out: dict[str, record.Signature] = {}
    for entry in entries:
        signatures = signatures_of(root, entry)
        if signatures is None:
            return None
        moving = record.MOVING_TAG.format(arch=entry.arch)
        out.update((s.path, s) for s in signatures
                   if newest[(entry.name, entry.arch)] is entry or s.identity.rsplit(":", 1)[1] != moving)
    return out


def problems(root: Path, signatures: dict[str, record.Signature], verifier) -> list[str]:
    """`repo verify`: each listed signature file present, and a good simple signature by `verifier`'s keys of what
    its manifest says it signs (tmplbuild.oci.simplesign.check, as stock skopeo checks it)."""
    out = []
    for path, sig in sorted(signatures.items()):
        try:
            with open(root / path, "rb") as f:
                data = f.read(simplesign.MAX_SIGNATURE + 1)
        except OSError:
            out.append(f"{path}: listed in {sig.identity}'s manifest but missing")
            continue
        try:
            simplesign.check(verifier, data, sig.identity, sig.digest)
        except AuthenticityError as exc:
            out.append(f"{path}: {exc}")
    return out


def resign(root: Path, entries: Iterable[idx.Entry], signer, verifier) -> int:
    """Carrying an index over after a rotation: every lookaside signature `entries` list that `verifier` (the
    newest root's online keys) does not accept is made again by `signer`, checked, and renamed into place; the
    manifests need no change (they list each file by path and identity, not by hash). Returns how many. Raises
    AuthenticityError, LocalIOError."""
    from tmplbuild import __version__

    count = 0
    for path, sig in sorted((listed(root, entries) or {}).items()):
        final = root / path
        try:
            simplesign.check(verifier, final.read_bytes(), sig.identity, sig.digest)
            continue
        except (AuthenticityError, OSError):
            pass
        data = simplesign.sign(signer, sig.identity, sig.digest, creator=f"tmplbuild {__version__}")
        os.replace(stage(root, sig, data, verifier), final)
        count += 1
    return count


def stage(root: Path, sig: record.Signature, data: bytes, verifier) -> Path:
    """Check the signature `data` as stock skopeo will (with `verifier`'s keys: a good signed message of what
    `sig` says it signs) and write it, durably, to a hidden .part name beside its place under sigstore/, which it
    returns for the caller to rename in. Raises AuthenticityError, LocalIOError."""
    from tmplbuild.repo import store

    simplesign.check(verifier, data, sig.identity, sig.digest)
    final = root / sig.path
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise store.io_error("mkdir", final.parent, exc) from None
    tmp = final.with_name(f".{final.name}.part")
    store.write_durable(tmp, data)
    return tmp
