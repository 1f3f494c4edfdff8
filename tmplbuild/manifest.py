"""A template's manifest, `<stem>.manifest.json`: what the builder made, from what, and what tested it.

A typed, frozen model like tmplbuild.repo.index: the builder creates one, `tmplbuild publish` and the weekly
rebuild read one (from the build output, or from a repository where the signed index pins its sha256), and
every change (the changelog, the boot-test record) is a new value made with `dataclasses.replace`. Pure: no
I/O. Unknown top-level fields are kept, so an older tmplbuild re-writing a newer manifest loses nothing.

The nested records (`build`, `tree`, `test`, `changelog`, `oci`) stay JSON objects: they are written once and read by
people and by the few functions named in their comments, not branched on across the code.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

SCHEMA = 1
_HEX64 = re.compile(r"\A[0-9a-f]{64}\Z")
_HEX128 = re.compile(r"\A[0-9a-f]{128}\Z")
_FILE = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._+~-]*\Z")
MAX_SIZE = 1 << 40  # bytes: no template file is a terabyte


class ManifestError(ValueError):
    """Bytes that are not a manifest; the message names the field. Callers turn it into their own typed error
    (UsageError for a local build output, AuthenticityError for a repository's)."""


@dataclass(frozen=True)
class Package:
    """One installed dpkg package. The fields after installed_size_kib came with the SBOMs (tmplbuild.sbom); a
    manifest from before them reads with "" there, and `source_name`/`source_ver` fall back as dpkg does (a
    package without a Source field is its own source, at its own version)."""

    name: str
    version: str
    arch: str = ""
    installed_size_kib: int = 0
    source: str = ""  # the source package (dpkg's ${source:Package})
    source_version: str = ""  # its version (${source:Version}; differs after a binNMU)
    maintainer: str = ""  # the Maintainer field: the supplier in the SBOMs
    sha256: str = ""  # the .deb's SHA-256 from the signed Packages index ("" when no verified index listed it)
    uri: str = ""  # where the build downloaded that .deb from ("" when unknown)
    license: str = ""  # an SPDX expression from a machine-readable debian/copyright, else "NOASSERTION"

    @property
    def source_name(self) -> str:
        return self.source or self.name

    @property
    def source_ver(self) -> str:
        return self.source_version or self.version

    def doc(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"name": self.name, "version": self.version, "arch": self.arch,
                               "installed_size_kib": self.installed_size_kib}
        for key in _PACKAGE_EXTRA:
            if getattr(self, key):
                doc[key] = getattr(self, key)
        return doc


_PACKAGE_EXTRA = ("source", "source_version", "maintainer", "sha256", "uri", "license")


@dataclass(frozen=True)
class ManifestArtifact:
    """One file of the template (a format), as the builder wrote it next to the manifest."""

    file: str
    format: str
    size: int
    sha256: str
    sha512: str

    def doc(self) -> dict[str, Any]:
        return {"file": self.file, "format": self.format, "size": self.size, "sha256": self.sha256,
                "sha512": self.sha512}


@dataclass(frozen=True)
class Manifest:
    name: str
    version: str
    arch: str
    distribution: str = ""
    release: str = ""
    suite: str = ""
    variant: str = ""
    description: str = ""
    created: str = ""
    source_date_epoch: int | None = None
    build: dict[str, Any] = field(default_factory=dict)  # input_hash, recipe_sha256, archive, mirror, tmplbuild…
    apt_sources: tuple[str, ...] = ()
    tree: dict[str, Any] = field(default_factory=dict)
    packages: tuple[Package, ...] = ()
    artifacts: tuple[ManifestArtifact, ...] = ()
    changelog: dict[str, Any] | None = None  # tmplbuild.rebuild.changelog
    test: dict[str, Any] | None = None  # tmplbuild.boot.gate.test_record
    # The OCI image (tmplbuild.oci.record): its digests as built, and once pushed, the registry reference, tags and
    # the lookaside signature files. An older tmplbuild keeps it (as an unknown field) and ignores it.
    oci: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # unknown top-level fields, kept

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.name, self.version, self.arch)

    @property
    def input_hash(self) -> str:
        return str(self.build.get("input_hash", ""))

    def package_set(self) -> set[tuple[str, str, str]]:
        return {(p.name, p.version, p.arch) for p in self.packages}

    def doc(self) -> dict[str, Any]:
        doc: dict[str, Any] = dict(self.extra)
        doc.update({
            "schema": SCHEMA, "name": self.name, "version": self.version, "arch": self.arch,
            "distribution": self.distribution, "release": self.release, "suite": self.suite,
            "variant": self.variant, "description": self.description, "created": self.created,
            "build": self.build, "apt_sources": list(self.apt_sources), "tree": self.tree,
            "packages": [p.doc() for p in self.packages], "artifacts": [a.doc() for a in self.artifacts],
        })
        for key, value in (("source_date_epoch", self.source_date_epoch), ("changelog", self.changelog),
                           ("test", self.test), ("oci", self.oci)):
            if value is not None:
                doc[key] = value
        return doc

    def to_bytes(self) -> bytes:
        return (json.dumps(self.doc(), indent=2, sort_keys=True) + "\n").encode()


_KNOWN = {"schema", "name", "version", "arch", "distribution", "release", "suite", "variant", "description",
          "created", "source_date_epoch", "build", "apt_sources", "tree", "packages", "artifacts", "changelog",
          "test", "oci"}


def parse(data: bytes) -> Manifest:
    """A strict parse (duplicate keys, NaN, depth and integer ranges refused as in every signed document).
    Raises ManifestError naming the field."""
    from tmplbuild import strictjson

    try:
        doc = strictjson.loads(data, what="manifest")
    except strictjson.StrictJSONError as exc:
        raise ManifestError(str(exc)) from None
    return from_doc(doc)


def from_doc(doc: Any) -> Manifest:
    """Raises ManifestError."""
    if not isinstance(doc, dict):
        raise ManifestError("top level is not an object")
    if doc.get("schema", SCHEMA) != SCHEMA:
        raise ManifestError(f"schema: found {doc.get('schema')!r}, expected {SCHEMA}")
    artifacts = tuple(_artifact(a, i) for i, a in enumerate(_get(doc, "artifacts", list)))
    packages = tuple(_package(p, i) for i, p in enumerate(doc.get("packages", [])))
    sde = doc.get("source_date_epoch")
    if sde is not None and (not isinstance(sde, int) or isinstance(sde, bool) or not 0 <= sde < 1 << 40):
        raise ManifestError(f"source_date_epoch: found {sde!r}, expected seconds since the epoch")
    optional = {}
    for name in ("changelog", "test", "oci"):
        value = doc.get(name)
        if value is not None and not isinstance(value, dict):
            raise ManifestError(f"{name}: found {type(value).__name__}, expected an object")
        optional[name] = value
    sources = doc.get("apt_sources", [])
    if not isinstance(sources, list) or not all(isinstance(s, str) for s in sources):
        raise ManifestError("apt_sources: expected a list of strings")
    return Manifest(
        name=_get(doc, "name", str), version=_get(doc, "version", str), arch=_get(doc, "arch", str),
        **{k: _get(doc, k, str, "") for k in ("distribution", "release", "suite", "variant", "description",
                                              "created")},
        source_date_epoch=sde, build=_get(doc, "build", dict, {}), apt_sources=tuple(sources),
        tree=_get(doc, "tree", dict, {}), packages=packages, artifacts=artifacts, **optional,
        extra={k: v for k, v in doc.items() if k not in _KNOWN})


_MISSING = object()


def _get(doc: dict[str, Any], key: str, kind: type, default: Any = _MISSING, where: str = "") -> Any:
    if key not in doc and default is not _MISSING:
        return default
    value = doc.get(key)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ManifestError(f"{where}{key}: found {type(value).__name__}, expected {kind.__name__}")
    return value


def _artifact(doc: Any, i: int) -> ManifestArtifact:
    where = f"artifacts[{i}]."
    if not isinstance(doc, dict):
        raise ManifestError(f"artifacts[{i}]: expected an object")
    art = ManifestArtifact(file=_get(doc, "file", str, where=where), format=_get(doc, "format", str, where=where),
                           size=_get(doc, "size", int, where=where), sha256=_get(doc, "sha256", str, where=where),
                           sha512=_get(doc, "sha512", str, where=where))
    if not _FILE.match(art.file):
        raise ManifestError(f"{where}file: found {art.file!r}, expected a file name next to the manifest")
    if not 0 <= art.size <= MAX_SIZE:
        raise ManifestError(f"{where}size: found {art.size}, expected 0 to {MAX_SIZE}")
    if not _HEX64.match(art.sha256) or not _HEX128.match(art.sha512):
        raise ManifestError(f"{where}: malformed sha256 or sha512")
    return art


def _package(doc: Any, i: int) -> Package:
    where = f"packages[{i}]."
    if not isinstance(doc, dict):
        raise ManifestError(f"packages[{i}]: expected an object")
    size = _get(doc, "installed_size_kib", int, 0, where)
    if not 0 <= size <= MAX_SIZE:
        raise ManifestError(f"{where}installed_size_kib: found {size}, expected 0 to {MAX_SIZE}")
    sha = _get(doc, "sha256", str, "", where)
    if sha and not _HEX64.match(sha):
        raise ManifestError(f"{where}sha256: malformed")
    return Package(name=_get(doc, "name", str, where=where), version=_get(doc, "version", str, where=where),
                   arch=_get(doc, "arch", str, "", where), installed_size_kib=size,
                   **{k: _get(doc, k, str, "", where) for k in _PACKAGE_EXTRA})
