"""The signed catalogue, index.json: its model, its exact bytes, and a strict parse of untrusted bytes.

Pure: no I/O. The bytes that are signed are the bytes served; parsing happens only after the signature over
those exact bytes was verified (see tmplbuild.sign.verify)."""
from __future__ import annotations

import dataclasses
import json
import re
import time
from dataclasses import dataclass, field
from typing import Any

from tmplbuild import strictjson
from tmplbuild.errors import AuthenticityError, UsageError

SCHEMA = 1
# The documented range of every integer in an index; anything outside is refused as "index schema" (exit 3)
# and never remembered by a client. Bools are not integers here.
VERSION_MIN, VERSION_MAX = 1, 2**53 - 1  # JSON-safe: every JSON reader holds it exactly
SIZE_MIN, SIZE_MAX = 0, 2**40  # bytes (1 TiB): of a template file or a manifest
# expires - generated: at most this long, and positive. A signed index that lives longer is refused as "index
# schema" (exit 3): it is a property of the signed bytes, whatever the clock says. `--expires-in` defaults to
# 30d and 1y (365 days) is the longest duration the CLI's units express within this.
MAX_LIFETIME = 366 * 86400
MAX_DEPTH = 16  # nesting of [ and { in index.json (the index itself is 5 deep)
# What any reader downloads at most (the client, `publish --to`): an index of 10,000 template versions, each with
# its seven files, measures 43 MB; a detached armored signature is a few kB.
INDEX_CAP = 64 << 20
SIGNATURE_CAP = 64 << 10
STAMP = re.compile(r"\A[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z\Z")
HEX64 = re.compile(r"\A[0-9a-f]{64}\Z")
HEX128 = re.compile(r"\A[0-9a-f]{128}\Z")
NAME = re.compile(r"\A[a-z0-9][a-z0-9.+-]*\Z")
VERSION = re.compile(r"\A[0-9A-Za-z][0-9A-Za-z.+~-]*\Z")
# Paths inside the repository: templates/<name>/<version>/<file>, nothing that climbs out.
PATH = re.compile(r"\Atemplates/[a-z0-9][a-z0-9.+-]*/[0-9A-Za-z][0-9A-Za-z.+~-]*/[A-Za-z0-9][A-Za-z0-9._+~-]*\Z")


# What a template entry may list, each as <name>_<version>_<arch>.<format>: the root file system for Proxmox and
# LXC (zstd), for lxc-create -t local and systemd 252 (xz), LXC's metadata tarball for lxc-create -t local, and
# the OCI image as an oci-archive (Proxmox VE 9.1, lxc-oci, skopeo). The rootfs and OCI formats are the recipe's
# `formats` (tmplbuild.recipe.model.Compression; a test keeps them equal), written out so that reading an index
# does not import the recipe parser. A tmplbuild older than the OCI format reads such an index as before: it
# takes files[0] (tar.zst) unless asked for another format.
ROOTFS_FORMATS = ("tar.zst", "tar.xz")
LXC_META_FORMAT = "lxc-meta.tar.xz"
OCI_FORMAT = "oci.tar"
# What the template is made of and how (tmplbuild.sbom.documents): SPDX and CycloneDX SBOMs and the in-toto SLSA
# provenance. Listed after the template's own files; a tmplbuild older than them lists, verifies and keeps them
# like any file, and fetches files[0] as before.
SPDX_FORMAT, CYCLONEDX_FORMAT, PROVENANCE_FORMAT = "spdx.json", "cdx.json", "intoto.json"
DOCUMENT_FORMATS = (SPDX_FORMAT, CYCLONEDX_FORMAT, PROVENANCE_FORMAT)
FORMATS = (*ROOTFS_FORMATS, LXC_META_FORMAT, OCI_FORMAT, *DOCUMENT_FORMATS)
# A delta (tmplbuild.repo.deltas writes it, tmplbuild.client.delta applies it): the entry's tar.zst rebuilt from
# an earlier version's. Listed among the entry's files after everything else, with what it applies to and how the
# result is compressed (DeltaInfo); hashed in SHA256SUMS, signed, served and pruned like any file of the version.
# A tmplbuild older than deltas lists, verifies and keeps it like any file, and fetches files[0] as before. It is
# never a template format: `fetch --format` does not offer it and `template_files` leaves it out.
DELTA_FORMAT = "tar.zst.delta"


@dataclass(frozen=True)
class DeltaInfo:
    """What a delta applies to and what it gives: the base file (its version, size and sha256: the tar.zst a node
    already holds), the target tar's size, and how that tar was compressed into the entry's tar.zst (the builder's
    zstd parameters and the libzstd version whose output the publisher reproduced)."""

    base_version: str
    base_size: int
    base_sha256: str
    tar_size: int
    zstd_version: str  # "1.5.7": the libzstd that compressed it (python-zstandard's bundled one)
    zstd_level: int
    zstd_window_log: int

    def to_doc(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def delta_file_name(name: str, version: str, arch: str, base_version: str) -> str:
    """A delta's file name in its version's directory: `<stem>.from-<base version>.tar.zst.delta`."""
    return f"{name}_{version}_{arch}.from-{base_version}.{DELTA_FORMAT}"


@dataclass(frozen=True)
class FileRef:
    path: str
    size: int
    sha256: str
    sha512: str = ""  # the manifest reference carries sha256 and size only
    format: str = ""  # one of FORMATS for template files, DELTA_FORMAT for a delta
    delta: DeltaInfo | None = None  # for DELTA_FORMAT


@dataclass(frozen=True)
class Entry:
    name: str
    version: str
    arch: str
    distribution: str
    release: str
    variant: str
    description: str
    created: str
    input_hash: str
    files: tuple[FileRef, ...]  # the template in each format, tar.zst first when present; then its deltas
    manifest: FileRef

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.name, self.version, self.arch)

    @property
    def template_files(self) -> tuple[FileRef, ...]:
        """Its files but the deltas: what the builder made (and the manifest lists)."""
        return tuple(f for f in self.files if f.delta is None)

    @property
    def deltas(self) -> tuple[FileRef, ...]:
        return tuple(f for f in self.files if f.delta is not None)

    @property
    def directory(self) -> str:
        return f"templates/{self.name}/{self.version}"


@dataclass(frozen=True)
class Index:
    repo_id: str
    version: int
    generated: str
    expires: str
    templates: tuple[Entry, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)  # unknown top-level fields: kept, still signed

    def to_bytes(self) -> bytes:
        doc: dict[str, Any] = dict(self.extra)
        doc.update({
            "schema": SCHEMA, "repo_id": self.repo_id, "version": self.version,
            "generated": self.generated, "expires": self.expires,
            "templates": [_entry_doc(e) for e in sorted(self.templates, key=lambda e: e.key)],
        })
        return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()

    def successor(self, templates: tuple[Entry, ...], expires_in: int, now: float | None = None) -> "Index":
        """The next index: version + 1, fresh generated and expires stamps. Raises UsageError when
        `expires_in` is outside 1 second..MAX_LIFETIME (clients would refuse the index)."""
        check_lifetime(expires_in)
        now = time.time() if now is None else now
        return Index(repo_id=self.repo_id, version=self.version + 1, generated=stamp(now),
                     expires=stamp(now + expires_in), templates=templates, extra=self.extra)


def check_lifetime(expires_in: int) -> None:
    """What `--expires-in` may ask for: a new index that clients accept. Raises UsageError."""
    if not 0 < expires_in <= MAX_LIFETIME:
        raise UsageError("duration", f"index lifetime {expires_in}s, expected 1s to {MAX_LIFETIME // 86400}d "
                                     "(clients refuse an index that lives longer)")


def stamp(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(int(t)))


def parse_stamp(value: str) -> int:
    """Seconds since the epoch of a `YYYY-MM-DDTHH:MM:SSZ` stamp (exactly that form). Raises ValueError."""
    import calendar

    if not isinstance(value, str) or not STAMP.match(value):
        raise ValueError(f"stamp {str(value)[:40]!r}: expected YYYY-MM-DDTHH:MM:SSZ")
    return calendar.timegm(time.strptime(value, "%Y-%m-%dT%H:%M:%SZ"))


def _ref_doc(ref: FileRef) -> dict[str, Any]:
    doc: dict[str, Any] = {"path": ref.path, "size": ref.size, "sha256": ref.sha256}
    if ref.sha512:
        doc["sha512"] = ref.sha512
    if ref.format:
        doc["format"] = ref.format
    if ref.delta is not None:
        doc["delta"] = ref.delta.to_doc()
    return doc


def _entry_doc(e: Entry) -> dict[str, Any]:
    primary = e.files[0]
    return {
        "name": e.name, "version": e.version, "arch": e.arch, "distribution": e.distribution,
        "release": e.release, "variant": e.variant, "description": e.description, "created": e.created,
        "input_hash": e.input_hash,
        # The primary file's fields at the top level: what a simple client (or a person) reads first.
        "path": primary.path, "size": primary.size, "sha256": primary.sha256, "sha512": primary.sha512,
        "format": primary.format,
        "files": [_ref_doc(f) for f in e.files], "manifest": _ref_doc(e.manifest),
    }


class _Bad(Exception):
    pass


def parse(data: bytes) -> Index:
    """A strict parse of verified index bytes. Raises AuthenticityError("index schema", ...) naming the field
    that is wrong: a signed index that does not parse is still not something to act on."""
    try:
        doc = strictjson.loads(data, what="index.json", max_depth=MAX_DEPTH)
        if not isinstance(doc, dict):
            raise _Bad("top level is not an object")
        schema = doc.get("schema")
        if type(schema) is not int or schema != SCHEMA:
            raise _Bad(f"schema: found {schema!r}, expected {SCHEMA}")
        templates = tuple(_entry(t, i) for i, t in enumerate(_get(doc, "templates", list)))
        keys = [t.key for t in templates]
        if len(set(keys)) != len(keys):
            raise _Bad("templates: the same name/version/arch is listed twice")
        version = _int(doc, "version", VERSION_MIN, VERSION_MAX)
        generated, expires = (_stamp_field(doc, name) for name in ("generated", "expires"))
        if expires <= generated:
            raise _Bad(f"expires {doc['expires']}: not after generated {doc['generated']}")
        if expires - generated > MAX_LIFETIME:
            raise _Bad(f"lifetime (expires - generated) {expires - generated}s, expected at most "
                       f"{MAX_LIFETIME}s ({MAX_LIFETIME // 86400} days)")
        known = {"schema", "repo_id", "version", "generated", "expires", "templates"}
        return Index(repo_id=_get(doc, "repo_id", str), version=version, generated=doc["generated"],
                     expires=doc["expires"], templates=templates,
                     extra={k: v for k, v in doc.items() if k not in known})
    except (_Bad, ValueError, UnicodeDecodeError) as exc:
        raise AuthenticityError("index schema", str(exc)) from None


def _int(doc: dict[str, Any], key: str, low: int, high: int, where: str = "") -> int:
    """An integer field within its documented range (bools refused)."""
    value = _get(doc, key, int, where)
    if not low <= value <= high:
        raise _Bad(f"{where}{key}: found {value}, expected {low} to {high}")
    return value


def _stamp_field(doc: dict[str, Any], key: str) -> int:
    value = _get(doc, key, str)
    try:
        return parse_stamp(value)
    except ValueError:
        raise _Bad(f"{key}: found {value[:40]!r}, expected YYYY-MM-DDTHH:MM:SSZ") from None


def _get(doc: dict[str, Any], key: str, kind: type, where: str = "") -> Any:
    value = doc.get(key)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise _Bad(f"{where}{key}: found {type(value).__name__}, expected {kind.__name__}")
    return value


def _ref(doc: Any, where: str, with_sha512: bool) -> FileRef:
    if not isinstance(doc, dict):
        raise _Bad(f"{where}: expected an object")
    path, size, sha256 = _get(doc, "path", str, where + "."), _int(doc, "size", SIZE_MIN, SIZE_MAX, where + "."), \
        _get(doc, "sha256", str, where + ".")
    sha512 = _get(doc, "sha512", str, where + ".") if with_sha512 else doc.get("sha512", "")
    if not PATH.match(path):
        raise _Bad(f"{where}.path: found {path!r}, expected templates/<name>/<version>/<file>")
    if not HEX64.match(sha256) or (with_sha512 and not HEX128.match(sha512)):
        raise _Bad(f"{where}: malformed size or hash")
    fmt = doc.get("format", "")
    delta = _delta(_get(doc, "delta", dict, where + "."), where + ".delta") if fmt == DELTA_FORMAT else None
    return FileRef(path=path, size=size, sha256=sha256, sha512=sha512, format=fmt, delta=delta)


ZSTD_VERSION = re.compile(r"\A[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}\Z")


def _delta(doc: dict[str, Any], where: str) -> DeltaInfo:
    base_version, base_sha256 = _get(doc, "base_version", str, where + "."), _get(doc, "base_sha256", str, where + ".")
    zstd_version = _get(doc, "zstd_version", str, where + ".")
    if not VERSION.match(base_version) or not HEX64.match(base_sha256) or not ZSTD_VERSION.match(zstd_version):
        raise _Bad(f"{where}: malformed base_version, base_sha256 or zstd_version")
    return DeltaInfo(base_version=base_version, base_size=_int(doc, "base_size", SIZE_MIN, SIZE_MAX, where + "."),
                     base_sha256=base_sha256, tar_size=_int(doc, "tar_size", SIZE_MIN, SIZE_MAX, where + "."),
                     zstd_version=zstd_version, zstd_level=_int(doc, "zstd_level", 1, 22, where + "."),
                     zstd_window_log=_int(doc, "zstd_window_log", 10, 31, where + "."))


def _entry(doc: Any, i: int) -> Entry:
    where = f"templates[{i}]"
    if not isinstance(doc, dict):
        raise _Bad(f"{where}: expected an object")
    name, version = _get(doc, "name", str, where + "."), _get(doc, "version", str, where + ".")
    if not NAME.match(name) or not VERSION.match(version):
        raise _Bad(f"{where}: malformed name or version")
    files = tuple(_ref(f, f"{where}.files[{j}]", True) for j, f in enumerate(_get(doc, "files", list, where + ".")))
    if not files:
        raise _Bad(f"{where}.files: empty")
    if "size" in doc:  # the primary file's size, repeated at the top level for simple readers
        _int(doc, "size", SIZE_MIN, SIZE_MAX, where + ".")
    primary = _ref_doc(files[0])
    for key in ("path", "size", "sha256", "sha512", "format"):  # repeated: must say the same as files[0]
        if key in doc and doc[key] != primary.get(key, ""):
            raise _Bad(f"{where}.{key}: found {str(doc[key])[:80]!r}, expected {str(primary.get(key, ''))[:80]!r} "
                       "(files[0], the primary file)")
    entry = Entry(
        name=name, version=version, arch=_get(doc, "arch", str, where + "."),
        distribution=_get(doc, "distribution", str, where + "."), release=_get(doc, "release", str, where + "."),
        variant=_get(doc, "variant", str, where + "."), description=_get(doc, "description", str, where + "."),
        created=_get(doc, "created", str, where + "."), input_hash=_get(doc, "input_hash", str, where + "."),
        files=files, manifest=_ref(_get(doc, "manifest", dict, where + "."), f"{where}.manifest", False),
    )
    for ref in (*files, entry.manifest):
        if not ref.path.startswith(entry.directory + "/"):
            raise _Bad(f"{where}: {ref.path} is outside {entry.directory}/")
    if files[0].delta is not None:
        raise _Bad(f"{where}.files[0]: a delta, expected the template itself")
    return entry
