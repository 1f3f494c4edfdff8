"""The repository's lookaside tree, `sigstore/`: the "simple signing" signatures of the OCI images a publish
pushed, where stock skopeo and podman look for them (registries.d `lookaside:` pointing at `<repository URL>/sigstore`).

The index lists them through the template manifests it hashes (the manifest's `oci.registry.signatures`,
tmplbuild.oci.record), so convergence, `repo verify`, prune and remove know them as they know template files.
Reads the repository directory; the caller holds the lock where it writes."""
from __future__ import annotations

import hashlib
from pathlib import Path

from tmplbuild.manifest import ManifestError
from tmplbuild.manifest import parse as parse_manifest
from tmplbuild.oci import record
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
    if b'"oci"' not in data:  # most manifests: no parse needed
        return None
    try:
        manifest = parse_manifest(data)
        return None if manifest.oci is None else record.parse(manifest.oci)
    except (ManifestError, ValueError) as exc:
        raise Unreadable(f"{entry.manifest.path}: {exc}") from None


def signatures_of(root: Path, entry: idx.Entry) -> list[record.Signature] | None:
    """The lookaside files `entry`'s manifest lists ([] for an image never pushed, or no image); None when the
    manifest is Unreadable: then nobody can tell what is listed."""
    try:
        rec = image_record(root, entry)
    except Unreadable:
        return None
    return list(rec.registry.signatures) if rec is not None and rec.registry is not None else []


def listed(root: Path, index: idx.Index) -> dict[str, record.Signature] | None:
    """Every lookaside file `index` lists, by path; None when any listed manifest cannot be read as signed (see
    signatures_of): then nothing under sigstore/ may be taken for a leftover.

    A moving tag's signature (latest-<arch>) is listed for the newest version of its line only: once a newer
    version is published, the older image's moving-tag signature goes (convergence removes it), so a registry that
    points the moving tag back at the older image fails skopeo's signature check. Its version tag keeps its own."""
    newest = {}
    for entry in index.templates:  # by created, then version: what `fetch` takes as the newest
        line = (entry.name, entry.arch)
        if line not in newest or (entry.created, entry.version) > (newest[line].created, newest[line].version):
            newest[line] = entry
    out: dict[str, record.Signature] = {}
    for entry in index.templates:
        signatures = signatures_of(root, entry)
        if signatures is None:
            return None
        moving = record.MOVING_TAG.format(arch=entry.arch)
        out.update((s.path, s) for s in signatures
                   if newest[(entry.name, entry.arch)] is entry or s.identity.rsplit(":", 1)[1] != moving)
    return out


def problems(root: Path, signatures: dict[str, record.Signature]) -> list[str]:
    """`repo verify`: each listed signature file present with its signed size and sha256."""
    out = []
    for path, sig in sorted(signatures.items()):
        try:
            data = (root / path).read_bytes()
        except OSError:
            out.append(f"{path}: listed in {sig.identity}'s manifest but missing")
            continue
        if (len(data), hashlib.sha256(data).hexdigest()) != (sig.size, sig.sha256):
            out.append(f"{path}: size/sha256 {len(data)}/{hashlib.sha256(data).hexdigest()[:16]}…, its manifest "
                       f"says {sig.size}/{sig.sha256[:16]}…")
    return out
