"""The manifest's `oci` record: the image a build made and, once published, where it is in a registry.

Written into `<stem>.manifest.json`, whose sha256 the signed index carries, so the index binds the image's
digests (manifest, config, layer, diff_id) and the registry reference a publish pushed it to. Pure: no I/O.

    "oci": {"file": "<stem>.oci.tar", <OciImage.doc(): media_type, manifest_digest, ..., layer_compression>,
            "registry": {"repository": "registry.example.org/templates/debian-12-minimal",
                         "tags": ["12-20261122-amd64", "latest-amd64"],
                         "signatures": [{"path": "sigstore/templates/debian-12-minimal@sha256=<hex>/signature-1",
                                         "identity": "registry.example.org/templates/debian-12-minimal:12-..."},
                                        ...]}}

A tmplbuild older than this record keeps it as an unknown manifest field and ignores it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from tmplbuild.manifest import Manifest
from tmplbuild.oci.image import ImageMeta, OciImage

_FILE = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._+~-]*\.oci\.tar\Z")
# docker's reference grammar, as skopeo reads it: host[:port]/path with lowercase components, and a tag.
_REPOSITORY = re.compile(r"\A(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*"
                         r"(?::[0-9]{1,5})?)(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)+\Z")
_TAG = re.compile(r"\A[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}\Z")
SIGNATURE_PATH = re.compile(r"\Asigstore/[a-z0-9._/-]+@sha256=[0-9a-f]{64}/signature-[1-9][0-9]{0,2}\Z")
MOVING_TAG = "latest-{arch}"  # one moving tag per template line (name, arch); the version tag never moves


def tags(version: str, arch: str) -> tuple[str, str]:
    """The version tag and the moving tag of a template line. Raises ValueError when the version holds a
    character a tag cannot carry (Debian versions may hold + and ~)."""
    result = (f"{version}-{arch}", MOVING_TAG.format(arch=arch))
    for tag in result:
        if not _TAG.match(tag):
            raise ValueError(f"tag {tag!r}: a registry tag is [A-Za-z0-9_][A-Za-z0-9_.-]{{0,127}}; build with a "
                             "version without + or ~")
    return result


@dataclass(frozen=True)
class Signature:
    """A lookaside file, listed by path and what it signs: like a template file's .asc, it is checked by its own
    OpenPGP signature (tmplbuild.oci.simplesign.check), not by a hash, so a key rotation can re-sign it without
    rewriting the signed manifest."""

    path: str  # in the repository: sigstore/<repository path>@sha256=<hex>/signature-N
    identity: str  # the docker-reference it signs (repository:tag)

    @property
    def digest(self) -> str:
        """The image's manifest digest, as the path names it."""
        return "sha256:" + self.path.split("@sha256=", 1)[1].split("/", 1)[0]

    def doc(self) -> dict[str, Any]:
        return {"path": self.path, "identity": self.identity}


@dataclass(frozen=True)
class Pushed:
    repository: str  # host[:port]/path, without a tag
    tags: tuple[str, ...]
    signatures: tuple[Signature, ...]

    def doc(self) -> dict[str, Any]:
        return {"repository": self.repository, "tags": list(self.tags),
                "signatures": [s.doc() for s in self.signatures]}


@dataclass(frozen=True)
class Record:
    file: str  # the oci-archive next to the manifest
    image: OciImage
    registry: Pushed | None = None

    def by_digest(self) -> str:
        """repository@sha256:…: what a pull by digest asks for (never a tag, which a registry can move)."""
        if self.registry is None:
            raise ValueError("the image was not pushed to a registry")
        return f"{self.registry.repository}@{self.image.manifest_digest}"

    def doc(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"file": self.file, **self.image.doc()}
        if self.registry is not None:
            doc["registry"] = self.registry.doc()
        return doc


def built(file: str, image: OciImage) -> dict[str, Any]:
    """The record a build writes."""
    return Record(file, image).doc()


def of(manifest: Manifest) -> Record | None:
    """The manifest's image record; None for a template without an image. Raises ValueError."""
    return None if manifest.oci is None else parse(manifest.oci)


def in_manifest(data: bytes) -> Record | None:
    """The image record of a manifest's bytes; None without one (most manifests, which are then not parsed at
    all). Raises ValueError (a ManifestError included)."""
    if b'"oci"' not in data:
        return None
    from tmplbuild.manifest import parse as parse_manifest

    return of(parse_manifest(data))


def image_meta(manifest: Manifest) -> ImageMeta:
    """What the image says about the template besides its tar, as the build gave it. Raises UsageError."""
    from tmplbuild.repo.index import parse_stamp

    epoch = manifest.source_date_epoch if manifest.source_date_epoch is not None else parse_stamp(manifest.created)
    return ImageMeta(name=manifest.name, version=manifest.version, arch=manifest.arch,
                     description=manifest.description, revision=manifest.input_hash, epoch=epoch)


def parse(doc: Any) -> Record:
    """The manifest's `oci` object, strictly. Raises ValueError naming the field."""
    if not isinstance(doc, dict):
        raise ValueError("oci: expected an object")
    file = doc.get("file")
    if not isinstance(file, str) or not _FILE.match(file):
        raise ValueError(f"oci.file: found {str(file)[:80]!r}, expected <stem>.oci.tar")
    image = OciImage.from_doc({k: v for k, v in doc.items() if k not in ("file", "registry")})
    registry = doc.get("registry")
    return Record(file, image, None if registry is None else _pushed(registry, image.manifest_digest))


def _pushed(doc: Any, digest: str) -> Pushed:
    if not isinstance(doc, dict) or set(doc) != {"repository", "tags", "signatures"}:
        raise ValueError("oci.registry: expected an object with repository, tags and signatures")
    repository, tag_list, signatures = doc["repository"], doc["tags"], doc["signatures"]
    if not isinstance(repository, str) or not _REPOSITORY.match(repository) or "/" not in repository:
        raise ValueError(f"oci.registry.repository: found {str(repository)[:120]!r}, expected host[:port]/path")
    if not isinstance(tag_list, list) or not tag_list or not all(isinstance(t, str) and _TAG.match(t)
                                                                 for t in tag_list):
        raise ValueError("oci.registry.tags: expected a non-empty list of registry tags")
    if not isinstance(signatures, list):
        raise ValueError("oci.registry.signatures: expected a list")
    parsed = []
    for i, s in enumerate(signatures):
        where = f"oci.registry.signatures[{i}]"
        if not isinstance(s, dict) or set(s) != {"path", "identity"}:
            raise ValueError(f"{where}: expected an object with path and identity")
        path, identity = s["path"], s["identity"]
        if not isinstance(path, str) or not SIGNATURE_PATH.match(path) or ".." in path.split("/") \
                or not path.split("@sha256=")[1].startswith(digest.removeprefix("sha256:")):
            raise ValueError(f"{where}.path: found {str(path)[:160]!r}, expected sigstore/<path>@sha256=<the "
                             "image's digest>/signature-N")
        if not isinstance(identity, str) or not identity.startswith(repository + ":") \
                or identity.rsplit(":", 1)[1] not in tag_list:
            raise ValueError(f"{where}.identity: found {str(identity)[:160]!r}, expected {repository}:<tag>")
        parsed.append(Signature(path, identity))
    return Pushed(repository, tuple(tag_list), tuple(parsed))
