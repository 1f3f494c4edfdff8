"""`fetch --oci`: a template's OCI image from the registry, with the repository's trust.

The signed index hashes the template's manifest, and the manifest names the image (tmplbuild.oci.record): its
registry repository and every digest. So, after the index passed every check of a normal fetch: download the
manifest (capped at its signed size, its sha256 the index's), pull the image *by digest* with skopeo into a
hidden OCI layout next to the destination, check each blob against the manifest's record (manifest, config,
layer digest and size, the diff_id of the gunzipped layer), write the oci-archive from them (the same bytes the
build wrote: tmplbuild.oci.image.assemble) and accept it only when its size, sha256 and sha512 are the index's
for `<stem>.oci.tar`. Then the atomic rename, as for any download. A registry serving anything else is refused
with exit 3, and nothing reaches the destination."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from tmplbuild.client import manifests, trust
from tmplbuild.client.download import hash_file, present
from tmplbuild.errors import AuthenticityError, LocalIOError, UsageError
from tmplbuild.files import fsync_path
from tmplbuild.oci import record, skopeo
from tmplbuild.oci.image import FORMAT, ImageMeta, assemble
from tmplbuild.transport import Transport


def image_record(transport: Transport, base: str, chosen: trust.Selected) -> tuple[record.Record, ImageMeta]:
    """The image the signed index names for `chosen` (its oci.tar entry), through the manifest the index hashes.
    Raises AuthenticityError ("manifest": not the signed bytes, or no image record for this file), UsageError
    (the image was never pushed to a registry), TransportError."""
    e = chosen.entry
    m = manifests.verified_manifest(transport, base, e, use_cache=False)  # a fetch leaves no state but its own
    try:
        rec = record.of(m)
    except ValueError as exc:
        raise AuthenticityError("manifest", f"{e.manifest.path}: {exc}") from None
    if rec is None or rec.file != chosen.filename:
        raise AuthenticityError("manifest", f"{e.manifest.path}: names no OCI image {chosen.filename}")
    if rec.registry is None:
        raise UsageError("oci", f"{e.name} {e.version} {e.arch}: its image was not pushed to a registry; fetch "
                                f"{chosen.filename} from the repository instead (--format {FORMAT}, without --oci)")
    return rec, record.image_meta(m)


def install(transport: Transport, base: str, chosen: trust.Selected, dest: Path, *, tls_verify: bool = True,
            authfile: Path | None = None) -> tuple[str, str]:
    """Pull, check and install the image; returns ("fetched", "present" or "replaced", the reference pulled). Raises
    AuthenticityError (the registry's blobs, the assembled archive against the signed index), UsageError,
    TransportError, LocalIOError."""
    ref = chosen.ref
    final = dest / chosen.filename
    rec, meta = image_record(transport, base, chosen)
    reference = rec.by_digest()
    if present(final, ref):
        return "present", reference
    replacing = os.path.lexists(final)
    layout = dest / f".{chosen.filename}.pull"
    part = dest / f".{chosen.filename}.part"
    try:
        shutil.rmtree(layout, ignore_errors=True)
        skopeo.pull_layout(reference, layout, tls_verify=tls_verify, authfile=authfile)
        assemble(layout, part, meta, rec.image)
        trust.check_file(ref, *hash_file(part), chosen.filename)
        fsync_path(part)
        os.replace(part, final)
        fsync_path(dest, directory=True)
    except OSError as exc:
        raise LocalIOError("destination", f"{final}: {exc.strerror}") from None
    finally:
        shutil.rmtree(layout, ignore_errors=True)
        part.unlink(missing_ok=True)
    return ("replaced" if replacing else "fetched"), reference
