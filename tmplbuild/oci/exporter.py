"""`tmplbuild oci export ARTIFACT`: the OCI image of a template that was built without the "oci" format.

Reads the template's tar.zst (or tar.xz) as its manifest lists it, checks its sha256 while streaming it, and writes
`<stem>.oci.tar` next to it (tmplbuild.oci.image.export: the same bytes a build with "oci" in its formats writes).
The manifest then lists the oci-archive and its image record, as a build would have written them."""
from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path
from typing import BinaryIO

from tmplbuild.errors import AuthenticityError, UsageError
from tmplbuild.files import atomic_write, hash_file
from tmplbuild.manifest import ManifestArtifact
from tmplbuild.oci import record
from tmplbuild.oci.image import FORMAT, OciImage, export, open_tar
from tmplbuild.repo.index import ROOTFS_FORMATS
from tmplbuild.repo.publish import load_artifact


class _Hashing:
    """Reads a file and hashes what was read, so the source is checked in the same pass as it is exported."""

    def __init__(self, f: BinaryIO) -> None:
        self.f, self.sha256, self.size = f, hashlib.sha256(), 0

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.sha256.update(data)
        self.size += len(data)
        return data


def export_artifact(path: Path, force: bool = False) -> tuple[Path, OciImage]:
    """Export the OCI image of the built template `path` (its .tar.zst, .tar.xz or .manifest.json) next to it, and
    record it in its manifest. Raises UsageError (no such build, an oci-archive already there without `force`),
    AuthenticityError (the template file is not the one its manifest lists), UnsafeContentError (a device under
    /dev, an OCI whiteout name), LocalIOError."""
    art = load_artifact(path)
    m = art.manifest
    source = next((a for a in m.artifacts if a.format in ROOTFS_FORMATS), None)
    if source is None:
        raise UsageError("oci export", f"{art.manifest_path.name} lists no .tar.zst or .tar.xz to make an image of")
    src = art.manifest_path.with_name(source.file)
    stem = f"{m.name}_{m.version}_{m.arch}"
    dest = art.manifest_path.with_name(f"{stem}.{FORMAT}")
    if dest.exists() and not force:
        raise UsageError("output", f"{dest} exists; pass --force to replace it")
    meta = record.image_meta(m)
    part = dest.with_name(f".{dest.name}.part")
    try:
        with open(src, "rb") as raw:
            hashing = _Hashing(raw)
            with open_tar(hashing, source.format) as stream:  # type: ignore[arg-type]
                image = export(stream, part, meta)
            while hashing.read(1 << 20):  # whatever the decompressor did not need to read
                pass
    except FileNotFoundError:
        raise UsageError("artifact", f"{src}: missing (listed in its manifest)") from None
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    if (hashing.size, hashing.sha256.hexdigest()) != (source.size, source.sha256):
        part.unlink(missing_ok=True)
        raise AuthenticityError("artifact hash", f"{src}: size/sha256 {hashing.size}/"
                                                 f"{hashing.sha256.hexdigest()[:16]}… differ from its manifest "
                                                 f"{source.size}/{source.sha256[:16]}…")
    os.replace(part, dest)
    size, sha256, sha512 = hash_file(dest)
    listed = ManifestArtifact(file=dest.name, format=FORMAT, size=size, sha256=sha256, sha512=sha512)
    artifacts = tuple(a for a in m.artifacts if a.format != FORMAT) + (listed,)
    atomic_write(art.manifest_path, dataclasses.replace(m, artifacts=artifacts,
                                                        oci=record.built(dest.name, image)).to_bytes())
    return dest, image
