"""`publish --oci REGISTRY/PATH`: push a template's OCI image to a registry and sign it, before the index names it.

For each template with an oci-archive: push it with skopeo
(`copy --preserve-digests`) under the version tag and the moving tag, refuse a registry that stored another
manifest digest, sign each tag with containers' simple signing (the publisher's key, an online key of the
newest root: publish checked that first) and return the manifest with the registry record and the lookaside files,
which the publisher writes into the repository with everything else, before the index swap. A failed push raises
before anything is written to the repository, so the index never names an image the registry does not hold."""
from __future__ import annotations

import dataclasses
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tmplbuild import __version__
from tmplbuild.errors import AuthenticityError, UsageError
from tmplbuild.manifest import Manifest
from tmplbuild.oci import record, simplesign, skopeo
from tmplbuild.repo.lookaside import DIRECTORY


@dataclass(frozen=True)
class Destination:
    """Where images go: a registry host[:port] and a path prefix; each template is a repository under it."""

    prefix: str
    tls_verify: bool = True
    authfile: Path | None = None

    def repository(self, name: str) -> str:
        return f"{self.prefix.rstrip('/')}/{name}"


def check_destination(prefix: str) -> None:
    """Raises UsageError for a prefix that is not host[:port]/path."""
    simplesign.parse_reference(f"{prefix.rstrip('/')}/x:t")


def image_of(manifest: Manifest, manifest_path: Path) -> record.Record:
    """The manifest's OCI record. Raises UsageError when the template has no OCI image."""
    try:
        rec = record.of(manifest)
    except ValueError as exc:
        raise UsageError("oci", f"{manifest_path.name}: {exc}") from None
    if rec is None:
        raise UsageError("oci", f"{manifest_path.name}: the template has no OCI image: add \"oci\" to the recipe's "
                                f"formats, or run `tmplbuild oci export {manifest_path}`")
    return rec


def push(manifest: Manifest, manifest_path: Path, dest: Destination, signer
         ) -> tuple[Manifest, list[tuple[record.Signature, bytes]]]:
    """Push and sign one template's image. Returns the manifest with its registry record and the lookaside files
    to write, as (the record's signature: its path in the repository and what it signs, bytes). Raises UsageError (no image, a version no tag can carry, the
    registry refused our credentials), AuthenticityError (the registry stored another digest than the image the
    manifest records), TransportError (the registry cannot be reached).

    The archive's own bytes are not hashed here: what the registry holds is bound by its digest, which must be the
    manifest's, and publish checks the file against the manifest when it copies it. The signatures need only that
    digest, so gpg signs while skopeo uploads."""
    rec = image_of(manifest, manifest_path)
    archive = manifest_path.with_name(rec.file)  # among the files the manifest lists (publish.load_artifact)
    try:
        tags = record.tags(manifest.version, manifest.arch)
    except ValueError as exc:
        raise UsageError("oci tag", str(exc)) from None
    repository = dest.repository(manifest.name)
    digest = rec.image.manifest_digest
    references = [f"{repository}:{tag}" for tag in tags]
    now = int(time.time())
    with ThreadPoolExecutor(max_workers=1) as pool:
        signing = pool.submit(lambda: [simplesign.sign(signer, ref, digest, creator=f"tmplbuild {__version__}",
                                                       timestamp=now) for ref in references])
        source: Path | str = archive
        for reference in references:
            stored = skopeo.push(source, reference, tls_verify=dest.tls_verify, authfile=dest.authfile)
            source = f"{repository}@{digest}"  # the next tag: the image is in place, the archive need not be read
            if stored != digest:
                raise AuthenticityError("oci push", f"{reference}: the registry stored manifest {stored}, expected "
                                                    f"{digest} (the image the manifest records)")
        signed = signing.result()
    files = [(record.Signature(f"{DIRECTORY}/{simplesign.lookaside_path(reference, digest, index)}", reference), data)
             for index, (reference, data) in enumerate(zip(references, signed), start=1)]
    pushed = dataclasses.replace(rec, registry=record.Pushed(repository, tags, tuple(sig for sig, _ in files)))
    return dataclasses.replace(manifest, oci=pushed.doc()), files
