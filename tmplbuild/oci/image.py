"""A template as an OCI image, in an oci-archive: the same tar always gives the same manifest digest.

The image has one layer, the template's own tar (tmplbuild.builder.pack.write_tar: sorted, clamped, numeric
owners), gzip-compressed by Python's zlib at a pinned level; Debian 12's umoci 0.4.7 refuses zstd layers. The
config says `Cmd ["/sbin/init"]` and `StopSignal "SIGRTMIN+3"`, which is what makes Proxmox VE create a system
container rather than an application one (pve-container src/PVE/LXC/Create.pm, restore_oci_archive: an init
command other than /sbin/init switches the console to `cmode: console` and the network to host-managed), and
has no `Env`, which Proxmox would copy into the container's configuration. Every JSON document is canonical
(sorted keys, no spaces) and every timestamp is SOURCE_DATE_EPOCH.

The oci-archive is a plain tar of an OCI image layout, members exactly `oci-layout`, `index.json` and
`blobs/sha256/<hex>`, without `./` and without directory entries: Proxmox VE 9.1 takes a `.tar` in its template
storage for an OCI image when `tar -tf` lists the lines `oci-layout` and `index.json` and one starting with
`blobs/` (pve-container src/PVE/LXC/Create.pm, archive_is_oci_format). Its headers are written here, not by
tarfile, so their bytes do not depend on the Python version: USTAR, owner 0:0 without names, mode 0644, mtime
SOURCE_DATE_EPOCH, no pax headers.

Run as `python -m tmplbuild.oci.image TAR_OR_TAR_ZST OUT.oci.tar --name N --version V --arch A --epoch E`.
"""
from __future__ import annotations

import argparse
import errno
import hashlib
import json
import os
import queue
import re
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from tmplbuild import __version__
from tmplbuild.errors import AuthenticityError, LocalIOError, TmplbuildError, UnsafeContentError, UsageError

FORMAT = "oci.tar"  # file suffix: <name>_<version>_<arch>.oci.tar
GZIP_LEVEL = 6
MEDIA_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
INIT = ["/sbin/init"]
STOP_SIGNAL = "SIGRTMIN+3"  # what systemd takes as "shut down cleanly" (SIGTERM makes it re-execute itself)
CHECK = "oci image"
CHECK_LAYER = "oci layer"

# Debian architecture -> OCI platform (Go's GOARCH and the variant the OCI image index spec lists).
PLATFORMS: dict[str, dict[str, str]] = {
    "amd64": {"architecture": "amd64"},
    "arm64": {"architecture": "arm64", "variant": "v8"},
    "armhf": {"architecture": "arm", "variant": "v7"},
    "armel": {"architecture": "arm", "variant": "v5"},
    "i386": {"architecture": "386"},
    "mips64el": {"architecture": "mips64le"},
    "mipsel": {"architecture": "mipsle"},
    "ppc64el": {"architecture": "ppc64le"},
    "riscv64": {"architecture": "riscv64"},
    "s390x": {"architecture": "s390x"},
    "loong64": {"architecture": "loong64"},
}

CHUNK = 1 << 20
# Chunks in flight between the tar writer and the compressing thread: enough to ride out the writer's bursts,
# few enough that a stalled disk stops the writer instead of filling memory.
QUEUE_CHUNKS = 8
BLOCK = 512
RECORD = 20 * BLOCK  # tar's default blocking factor: GNU tar and tarfile pad archives to it too
USTAR_MAX = 8**11 - 1  # an 11-digit octal size or mtime field
MAX_SIZE = 1 << 40  # bytes: no template is a terabyte
MAX_JSON = 1 << 20  # index.json, a manifest or a config larger than this is not one of ours
MAX_EXTENSION = 1 << 20  # a pax or GNU long-name header's data
SHA256_RE = re.compile(r"\Asha256:[0-9a-f]{64}\Z")
# The OCI image layout's grammar for org.opencontainers.image.ref.name, which skopeo's oci: and umoci enforce.
REF_NAME_RE = re.compile(r"\A[A-Za-z0-9]+(?:(?:[-._:@+]|--)[A-Za-z0-9]+)*(?:/[A-Za-z0-9]+(?:(?:[-._:@+]|--)"
                         r"[A-Za-z0-9]+)*)*\Z")
_MEMBER_RE = re.compile(r"\A(?:oci-layout|index\.json|blobs/sha256/[0-9a-f]{64})\Z")
_OCTAL_RE = re.compile(rb"\A *[0-7]+[ \x00]*\Z")
_ZERO_BLOCK = bytes(BLOCK)
_DOC_KEYS = {"media_type", "manifest_digest", "manifest_size", "config_digest", "layer_digest", "layer_size",
             "diff_id", "layer_compression", "platform"}


def canonical(doc: Any) -> bytes:
    """The one JSON serialisation of every document in the image: what its digest is taken over."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def rfc3339(epoch: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def compression() -> dict[str, Any]:
    """What made the layer's bytes. Another deflate implementation (zlib-ng, which some distributions' Python
    links as "zlib") or another zlib release may give other bytes, and so another digest: recorded to tell."""
    version = zlib.ZLIB_RUNTIME_VERSION
    return {"format": "gzip", "implementation": "zlib-ng" if "zlib-ng" in version else "zlib", "version": version,
            "level": GZIP_LEVEL}


@dataclass(frozen=True)
class ImageMeta:
    """What the image says about the template besides its tar. Raises UsageError for an architecture without an
    OCI platform, an epoch a tar header cannot hold, or a version that cannot make an OCI reference name."""

    name: str
    version: str
    arch: str  # Debian's: amd64, arm64, armhf, ...
    description: str
    revision: str  # the build's input hash, e.g. "sha256:ab12..."
    epoch: int  # SOURCE_DATE_EPOCH

    def __post_init__(self) -> None:
        if self.arch not in PLATFORMS:
            raise UsageError(CHECK, f"architecture {self.arch!r} has no OCI platform here; expected one of "
                                    f"{', '.join(sorted(PLATFORMS))}")
        if type(self.epoch) is not int or not 0 <= self.epoch <= USTAR_MAX:
            raise UsageError(CHECK, f"epoch {self.epoch!r}: expected whole seconds from 0 to {USTAR_MAX}")
        if not self.name:
            raise UsageError(CHECK, "the image needs the template's name")
        if not REF_NAME_RE.match(self.ref_name):
            raise UsageError(CHECK, f"reference name {self.ref_name!r} (<version>-<arch>) does not follow the OCI "
                                    "image layout's grammar (letters and digits joined by single - . _ : @ +); "
                                    "build with a version without ~")

    @property
    def platform(self) -> dict[str, str]:
        return {"os": "linux", **PLATFORMS[self.arch]}

    @property
    def ref_name(self) -> str:
        """The index.json entry's org.opencontainers.image.ref.name (skopeo's `oci-archive:FILE:REF`)."""
        return f"{self.version}-{self.arch}"

    @property
    def created(self) -> str:
        return rfc3339(self.epoch)


@dataclass(frozen=True)
class OciImage:
    manifest_digest: str  # "sha256:<hex>"
    manifest_size: int
    config_digest: str
    layer_digest: str
    layer_size: int
    diff_id: str  # sha256 of the uncompressed layer: the template tar
    compression: dict[str, Any]  # compression(): {"format": "gzip", "implementation": "zlib", ...}
    platform: dict[str, str]  # the index entry's: {"os": "linux", "architecture": "arm", "variant": "v7"}

    def doc(self) -> dict[str, Any]:
        """The JSON-able record for the build manifest (tmplbuild.oci.record)."""
        return {"media_type": MEDIA_MANIFEST, "manifest_digest": self.manifest_digest,
                "manifest_size": self.manifest_size, "config_digest": self.config_digest,
                "layer_digest": self.layer_digest, "layer_size": self.layer_size, "diff_id": self.diff_id,
                "layer_compression": dict(self.compression), "platform": dict(self.platform)}

    @classmethod
    def from_doc(cls, doc: Any) -> OciImage:
        """Exactly the keys doc() writes, each checked. Raises ValueError naming the field."""
        if not isinstance(doc, dict):
            raise ValueError("oci: expected an object")
        if set(doc) != _DOC_KEYS:
            missing, extra = sorted(_DOC_KEYS - set(doc)), sorted(set(doc) - _DOC_KEYS)
            raise ValueError("oci: " + "; ".join(
                [f"missing {', '.join(missing)}"] * bool(missing) + [f"unknown {', '.join(extra)}"] * bool(extra)))
        if doc["media_type"] != MEDIA_MANIFEST:
            raise ValueError(f"oci.media_type: found {str(doc['media_type'])[:80]!r}, expected {MEDIA_MANIFEST}")
        for key in ("manifest_digest", "config_digest", "layer_digest", "diff_id"):
            if not isinstance(doc[key], str) or not SHA256_RE.match(doc[key]):
                raise ValueError(f"oci.{key}: found {str(doc[key])[:80]!r}, expected sha256:<64 hex digits>")
        for key in ("manifest_size", "layer_size"):
            if type(doc[key]) is not int or not 0 <= doc[key] <= MAX_SIZE:
                raise ValueError(f"oci.{key}: found {str(doc[key])[:40]!r}, expected an integer from 0 to {MAX_SIZE}")
        comp = doc["layer_compression"]
        if not isinstance(comp, dict) or set(comp) != {"format", "implementation", "version", "level"} \
                or comp["format"] != "gzip" or not isinstance(comp["implementation"], str) \
                or not isinstance(comp["version"], str) or type(comp["level"]) is not int \
                or not 0 <= comp["level"] <= 9:
            raise ValueError("oci.layer_compression: expected {format: gzip, implementation, version, level 0-9}")
        plat = doc["platform"]
        if not isinstance(plat, dict) or not {"os", "architecture"} <= set(plat) <= {"os", "architecture", "variant"} \
                or not all(isinstance(v, str) and v for v in plat.values()):
            raise ValueError("oci.platform: expected {os, architecture[, variant]} as non-empty strings")
        return cls(manifest_digest=doc["manifest_digest"], manifest_size=doc["manifest_size"],
                   config_digest=doc["config_digest"], layer_digest=doc["layer_digest"],
                   layer_size=doc["layer_size"], diff_id=doc["diff_id"], compression=dict(comp),
                   platform=dict(plat))


# --- the documents --------------------------------------------------------------------------------------------

OCI_LAYOUT = canonical({"imageLayoutVersion": "1.0.0"})


def config_bytes(meta: ImageMeta, diff_id: str) -> bytes:
    labels = {"org.opencontainers.image.created": meta.created, "org.opencontainers.image.title": meta.name,
              "org.opencontainers.image.version": meta.version, "org.opencontainers.image.revision": meta.revision,
              "org.opencontainers.image.description": meta.description}
    return canonical({
        "created": meta.created, **PLATFORMS[meta.arch], "os": "linux",
        "config": {"Cmd": INIT, "StopSignal": STOP_SIGNAL, "Labels": labels},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created": meta.created, "created_by": f"tmplbuild {__version__} {meta.name}"}],
    })


def manifest_bytes(meta: ImageMeta, config_digest: str, config_size: int, layer_digest: str,
                   layer_size: int) -> bytes:
    return canonical({
        "schemaVersion": 2, "mediaType": MEDIA_MANIFEST,
        "config": {"mediaType": MEDIA_CONFIG, "digest": config_digest, "size": config_size},
        "layers": [{"mediaType": MEDIA_LAYER, "digest": layer_digest, "size": layer_size}],
        "annotations": {"org.opencontainers.image.created": meta.created,
                        "org.opencontainers.image.version": meta.version,
                        "org.opencontainers.image.title": meta.name,
                        "org.opencontainers.image.revision": meta.revision},
    })


def index_bytes(meta: ImageMeta, manifest_digest: str, manifest_size: int) -> bytes:
    return canonical({
        "schemaVersion": 2, "mediaType": MEDIA_INDEX,
        "manifests": [{"mediaType": MEDIA_MANIFEST, "digest": manifest_digest, "size": manifest_size,
                       "platform": meta.platform,
                       "annotations": {"org.opencontainers.image.ref.name": meta.ref_name}}],
    })


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _blob(digest: str) -> str:
    return "blobs/sha256/" + digest.removeprefix("sha256:")


def ustar_header(name: str, size: int, mtime: int) -> bytes:
    """A USTAR header for a regular file: owner 0:0 without names, mode 0644."""
    raw = name.encode("ascii")
    if len(raw) > 100 or not 0 <= size <= USTAR_MAX or not 0 <= mtime <= USTAR_MAX:
        raise UsageError(CHECK, f"{name}: {size} bytes is more than a USTAR member holds (8 GiB)")
    h = bytearray(BLOCK)
    h[0:len(raw)] = raw
    h[100:108] = b"0000644\0"
    h[108:116] = h[116:124] = b"0000000\0"  # uid, gid
    h[124:136] = b"%011o\0" % size
    h[136:148] = b"%011o\0" % mtime
    h[148:156] = b" " * 8  # the checksum is summed with its own field as spaces
    h[156:157] = b"0"
    h[257:265] = b"ustar\x0000"
    h[329:337] = h[337:345] = b"0000000\0"  # devmajor, devminor
    h[148:156] = b"%06o\0 " % sum(h)
    return bytes(h)


# --- the layer: a tar stream in, gzip out, names checked on the way ----------------------------------------------

class _TarScanner:
    """Reads the member headers of a tar stream fed in chunks of any size, passing over member data without
    copying it, and refuses names an image layer must not hold: anything under dev/ (the container manager makes
    /dev; a device node there is one the host would create), a whiteout (`.wh.*`: unpacking deletes the named
    file, and Proxmox, umoci and lxc-oci all honour it), a `..` component. Names come from the USTAR fields, GNU
    long-name headers and pax `path` records alike: every name a reader might use is checked. Raises
    UnsafeContentError, or UsageError when the stream is not a tar."""

    def __init__(self) -> None:
        self.offset = 0  # stream bytes consumed
        self.ended = False
        self.entries = 0
        self._header = bytearray()
        self._skip = 0  # member data and padding still to pass over
        self._ext_kind = b""
        self._ext_left = 0
        self._ext_pad = 0
        self._ext = bytearray()
        self._names: list[str] = []  # names from extension headers, for the next member
        self._pax_size: int | None = None

    def feed(self, data: bytes | bytearray) -> None:
        view = memoryview(data)
        pos, end = 0, len(view)
        while pos < end and not self.ended:
            if self._skip:
                n = min(self._skip, end - pos)
                self._skip -= n
            elif self._ext_left:
                n = min(self._ext_left, end - pos)
                self._ext += view[pos:pos + n]
                self._ext_left -= n
                if not self._ext_left:
                    self._extension_done()
            else:
                n = min(BLOCK - len(self._header), end - pos)
                self._header += view[pos:pos + n]
                if len(self._header) == BLOCK:
                    self._on_header(bytes(self._header), self.offset + n - BLOCK)
                    self._header.clear()
            pos += n
            self.offset += n
        if pos < end and data.count(0, pos) != end - pos:
            # Readers stop at the first zero block (tarfile, Go's archive/tar, Rust's tar), `tar -i` does not:
            # nothing may hide there.
            raise UsageError(CHECK, f"data after the tar stream's end-of-archive block (byte {self.offset} on)")
        self.offset += end - pos  # what follows the end-of-archive blocks: zeros

    def finish(self) -> None:
        if not self.ended:
            raise UsageError(CHECK, f"the tar stream ends at byte {self.offset} without its end-of-archive block "
                                    "(truncated, or not a tar)")

    def _on_header(self, h: bytes, at: int) -> None:
        if h == _ZERO_BLOCK:
            self.ended = True  # a second zero block and the record's padding follow
            return
        if not _checksum_ok(h):
            raise UsageError(CHECK, f"not a tar stream: bad header checksum at byte {at}")
        kind = h[156:157]
        size = _number(h[124:136], at)
        if kind in (b"x", b"g", b"L", b"K"):
            if size > MAX_EXTENSION:
                raise UsageError(CHECK, f"tar extension header of {size} bytes at byte {at}")
            self._ext_kind, self._ext_left, self._ext_pad = kind, size, -size % BLOCK
            self._ext = bytearray()
            if not size:
                self._extension_done()
            return
        if self._pax_size is not None:
            size = self._pax_size  # a pax size replaces the header's (tarfile writes one from 8 GiB on)
        names = self._names + [_ustar_name(h)]
        self._names, self._pax_size = [], None
        for name in names:
            _check_layer_name(name, kind)
        self.entries += 1
        if kind not in (b"1", b"2", b"3", b"4", b"5", b"6"):  # as tarfile and GNU tar: only these have no data
            self._skip = size + (-size % BLOCK)

    def _extension_done(self) -> None:
        data, kind = bytes(self._ext), self._ext_kind
        self._skip, self._ext = self._ext_pad, bytearray()
        if kind == b"L":
            self._names.append(data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape"))
        elif kind in (b"x", b"g"):
            records = _pax_records(data, self.offset)
            if b"path" in records:
                self._names.append(records[b"path"].decode("utf-8", "surrogateescape"))
            if kind == b"x" and b"size" in records:
                if not records[b"size"].isdigit():
                    raise UsageError(CHECK, f"malformed pax size before byte {self.offset}")
                self._pax_size = int(records[b"size"])


def _checksum_ok(h: bytes) -> bool:
    """The header's checksum: the sum of its bytes with the checksum field as spaces, unsigned (POSIX) or signed
    (old Unix tars; tarfile and GNU tar accept both)."""
    if not _OCTAL_RE.match(h[148:156]):
        return False
    stored = int(h[148:156].rstrip(b"\0 ").lstrip(b" "), 8)
    unsigned = sum(h[:148]) + 256 + sum(h[156:])
    signed = unsigned - 256 * sum(1 for b in h[:148] + h[156:] if b > 127)
    return stored in (unsigned, signed)


def _number(field: bytes, at: int) -> int:
    """A size field: octal, or GNU's base-256 (sizes of 8 GiB and more)."""
    if field[0] == 0x80:
        return int.from_bytes(field[1:], "big")
    if field.strip(b"\0 ") and not _OCTAL_RE.match(field) or field[0] & 0x80:
        raise UsageError(CHECK, f"not a tar stream: malformed size in the header at byte {at}")
    return int(field.rstrip(b"\0 ").lstrip(b" ") or b"0", 8)


def _ustar_name(h: bytes) -> str:
    name = h[0:100].split(b"\0", 1)[0]
    prefix = h[345:500].split(b"\0", 1)[0]
    if h[257:263] == b"ustar\0" and prefix:
        name = prefix + b"/" + name
    return name.decode("utf-8", "surrogateescape")


def _pax_records(data: bytes, at: int) -> dict[bytes, bytes]:
    records: dict[bytes, bytes] = {}
    pos = 0
    while pos < len(data) and data[pos] != 0:
        space = data.find(b" ", pos)
        length = data[pos:space]
        if space < 0 or not length.isdigit() or int(length) <= space - pos or pos + int(length) > len(data) \
                or data[pos + int(length) - 1] != 0x0A:
            raise UsageError(CHECK, f"malformed pax header before byte {at}")
        key, eq, value = data[space + 1:pos + int(length) - 1].partition(b"=")
        if not eq:
            raise UsageError(CHECK, f"malformed pax record before byte {at}")
        records[key] = value
        pos += int(length)
    return records


def _check_layer_name(name: str, kind: bytes) -> None:
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeContentError(CHECK_LAYER, f"{name!r}: a '..' component reaches outside the root")
    if any(p.startswith(".wh.") for p in parts):
        raise UnsafeContentError(CHECK_LAYER, f"{name!r}: an OCI whiteout name (.wh.*) deletes files when the image "
                                              "is unpacked")
    if parts[:1] == ["dev"]:
        if len(parts) > 1:
            raise UnsafeContentError(CHECK_LAYER, f"{name!r} is under dev/: the image's /dev must be empty (the "
                                                  "container manager makes the device nodes)")
        if kind != b"5":
            raise UnsafeContentError(CHECK_LAYER, f"{name!r} is not a directory")


class LayerSink:
    """A write-only binary sink for the template tar stream, as pack.py's tee feeds every compressor: `write`
    then `close`. The tar is gzipped with zlib (level 6, header mtime 0 and no name: the bytes depend on the tar
    only), and both the tar (diff_id) and the gzip (layer digest) are hashed, on one background thread: zlib and
    hashlib release the GIL, so the tar writer, the other compressors of the tee and this thread keep the cores
    busy. The compressed layer goes to a hidden temporary file next to `dest`; `close()` writes the oci-archive
    to `dest` (the caller's temporary name) and sets `.image`.

    `write` and `close` raise LocalIOError on a write failure (disk full), UnsafeContentError for a name a layer
    must not hold, UsageError for a stream that is not a whole tar; after any of them nothing is left of what the
    sink wrote. `abort()` removes everything it wrote, `dest` included, at any time."""

    def __init__(self, dest: Path, meta: ImageMeta) -> None:
        self.dest = dest
        self.meta = meta
        self.image: OciImage | None = None
        self._layer_path = dest.with_name(f".{dest.name}.layer")
        self._buf = bytearray()
        self._queue: queue.Queue[bytearray | bytes | None] = queue.Queue(QUEUE_CHUNKS)
        self._error: BaseException | None = None
        self._closed = False
        self._scanner = _TarScanner()
        self._diff = hashlib.sha256()
        self._layer = hashlib.sha256()
        self._layer_size = 0
        # wbits 31: a gzip wrapper (header mtime 0, no name, OS byte of zlib's build: 3, Unix); memLevel 8 is
        # zlib's default and gzip's.
        self._zlib = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 31, 8)
        try:
            self._layer_file = open(self._layer_path, "wb")
        except OSError as exc:
            raise LocalIOError(CHECK, f"{self._layer_path}: {exc.strerror}") from None
        self._thread = threading.Thread(target=self._run, name=f"oci-layer {dest.name}", daemon=True)
        self._thread.start()

    def write(self, data: bytes) -> int:
        if self._error is not None:
            self._fail()
        if self._closed:
            raise ValueError("write to a closed LayerSink")
        n = len(data)
        if not self._buf and n >= CHUNK and isinstance(data, bytes):
            self._queue.put(data)
        else:
            # tarfile writes 10 KiB records: gathered into chunks so the thread hand-off costs nothing
            self._buf += data
            if len(self._buf) >= CHUNK:
                self._queue.put(self._buf)
                self._buf = bytearray()
        return n

    def close(self) -> None:
        """Ends the layer and writes the oci-archive to dest; sets `.image`. Raises as `write` does."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._buf:
                self._queue.put(self._buf)
                self._buf = bytearray()
            self._queue.put(None)
            self._thread.join()
            if self._error is not None:
                self._fail()
            self.image = self._write_archive()
        except OSError as exc:
            self.abort()
            raise LocalIOError(CHECK, f"{exc.filename or self.dest}: {exc.strerror}") from None
        except BaseException:
            self.abort()
            raise
        finally:
            self._layer_path.unlink(missing_ok=True)

    def abort(self) -> None:
        """Stops the thread and removes the temporary layer and dest. Never raises."""
        if self._thread.is_alive():
            self._error = self._error or RuntimeError("aborted")  # the thread discards what is still queued
            if not self._closed:
                self._closed = True
                self._queue.put(None)
            self._thread.join()
        try:
            self._layer_file.close()
        except OSError:
            pass  # the flush of what a full disk refused fails again; the file goes anyway
        self._layer_path.unlink(missing_ok=True)
        self.dest.unlink(missing_ok=True)
        self.image = None

    def _fail(self) -> None:
        error = self._error
        self.abort()
        if isinstance(error, OSError):
            raise LocalIOError(CHECK, f"{self._layer_path}: {error.strerror}") from None
        raise error  # type: ignore[misc]

    def _run(self) -> None:
        while (chunk := self._queue.get()) is not None:
            if self._error is not None:
                continue  # keep taking chunks, so a writer blocked on a full queue wakes up and sees the error
            try:
                self._scanner.feed(chunk)
                self._diff.update(chunk)
                self._emit(self._zlib.compress(chunk))
            except BaseException as exc:
                self._error = exc
        if self._error is None:
            try:
                self._scanner.finish()
                self._emit(self._zlib.flush())
                self._layer_file.close()
            except BaseException as exc:
                self._error = exc

    def _emit(self, out: bytes) -> None:
        if out:
            self._layer.update(out)
            self._layer_file.write(out)
            self._layer_size += len(out)

    def _write_archive(self) -> OciImage:
        meta = self.meta
        diff_id, layer_digest = "sha256:" + self._diff.hexdigest(), "sha256:" + self._layer.hexdigest()
        config = config_bytes(meta, diff_id)
        config_digest = _sha256(config)
        manifest = manifest_bytes(meta, config_digest, len(config), layer_digest, self._layer_size)
        manifest_digest = _sha256(manifest)
        write_archive(self.dest, meta, manifest, config, self._layer_path, layer_digest, self._layer_size)
        return OciImage(manifest_digest=manifest_digest, manifest_size=len(manifest), config_digest=config_digest,
                        layer_digest=layer_digest, layer_size=self._layer_size, diff_id=diff_id,
                        compression=compression(), platform=meta.platform)


def write_archive(dest: Path, meta: ImageMeta, manifest: bytes, config: bytes, layer_path: Path, layer_digest: str,
                  layer_size: int) -> None:
    """The oci-archive of an image at `dest`: oci-layout, index.json, manifest, config, then the layer, copied from
    `layer_path`; headers and padding always the same for the same blobs. Raises OSError."""
    mtime = meta.epoch
    manifest_digest = _sha256(manifest)
    index = index_bytes(meta, manifest_digest, len(manifest))
    head = b"".join(ustar_header(name, len(data), mtime) + data + bytes(-len(data) % BLOCK) for name, data in (
        ("oci-layout", OCI_LAYOUT), ("index.json", index), (_blob(manifest_digest), manifest),
        (_blob(_sha256(config)), config)))
    head += ustar_header(_blob(layer_digest), layer_size, mtime)
    total = len(head) + layer_size + (-layer_size % BLOCK) + 2 * BLOCK
    tail = bytes(-layer_size % BLOCK + 2 * BLOCK + (-total % RECORD))
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        _write_all(fd, head)
        with open(layer_path, "rb") as layer:
            _copy(layer.fileno(), fd, layer_size)
        _write_all(fd, tail)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _copy(src: int, dst: int, size: int) -> None:
    """size bytes from src to dst at their offsets: in the kernel (copy_file_range; a reflink on btrfs and XFS)
    where it can, else through a buffer."""
    left = size
    try:
        while left:
            n = os.copy_file_range(src, dst, min(left, 1 << 30))
            if n == 0:
                raise OSError(0, "the temporary layer is shorter than written")
            left -= n
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):  # not supported here
            raise
        while left:
            chunk = os.read(src, min(left, CHUNK))
            if not chunk:
                raise OSError(0, "the temporary layer is shorter than written") from None
            _write_all(dst, chunk)
            left -= len(chunk)


def open_tar(f: BinaryIO, fmt: str) -> BinaryIO:
    """The uncompressed tar read out of a template file `f` of format tar.zst or tar.xz (its every frame), as a
    stream to use in a `with` block."""
    if fmt == "tar.zst":
        import zstandard

        return zstandard.ZstdDecompressor().stream_reader(f, read_size=CHUNK, read_across_frames=True)  # type: ignore[return-value]
    if fmt == "tar.xz":
        import lzma

        return lzma.open(f)  # type: ignore[return-value]
    raise ValueError(f"{fmt}: not a compressed tar")


def export(tar_stream: BinaryIO, dest: Path, meta: ImageMeta) -> OciImage:
    """From an uncompressed template tar stream (e.g. zstandard's stream_reader over the .tar.zst) to the
    oci-archive at dest, through a hidden temporary name and os.replace: nothing at dest on failure. Raises
    LocalIOError, UnsafeContentError (exit 6) when the tar holds entries under dev/ other than the directory
    itself, an OCI whiteout name (.wh.*) or a `..` component anywhere, UsageError when it is not a whole tar."""
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.part")
    sink = LayerSink(tmp, meta)
    try:
        while True:
            try:
                chunk = tar_stream.read(CHUNK)
            except OSError as exc:
                name = getattr(tar_stream, "name", "the template tar")
                raise LocalIOError(CHECK, f"reading {name}: {exc.strerror or exc}") from None
            if not chunk:
                break
            sink.write(chunk)
        sink.close()
        os.replace(tmp, dest)
    except OSError as exc:
        sink.abort()
        raise LocalIOError(CHECK, f"{exc.filename or dest}: {exc.strerror}") from None
    except BaseException:
        sink.abort()
        raise
    assert sink.image is not None
    return sink.image


# --- reading an oci-archive ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ArchiveInfo:
    """An oci-archive as read_archive found it: member names in archive order (with sizes), and the documents."""

    members: tuple[tuple[str, int], ...]
    index: dict[str, Any]
    manifest_digest: str
    manifest_size: int
    manifest: dict[str, Any]
    config_digest: str
    config: dict[str, Any]
    layer_digest: str
    layer_size: int


def _refuse(path: Path, what: str) -> AuthenticityError:
    return AuthenticityError(CHECK, f"{path.name}: {what}")


def _members(f: BinaryIO, path: Path) -> Iterator[tuple[str, int, Iterator[bytes]]]:
    """(name, size, data chunks) of each member of a strict oci-archive, in order; data the caller does not read
    is skipped. USTAR or GNU headers with valid checksums, regular files only (no pax or GNU extension headers,
    no directories, no links), names exactly oci-layout, index.json or blobs/sha256/<hex>, each once; after the
    end-of-archive blocks, zeros only. Raises AuthenticityError."""
    seen: set[str] = set()
    offset = 0
    while True:
        h = f.read(BLOCK)
        if len(h) < BLOCK:
            raise _refuse(path, f"truncated: no end-of-archive block after byte {offset}")
        if h == _ZERO_BLOCK:
            if f.read(BLOCK) != _ZERO_BLOCK:
                raise _refuse(path, f"a lone zero block at byte {offset}: expected two at the end of the archive")
            while rest := f.read(CHUNK):
                if rest.count(0) != len(rest):
                    raise _refuse(path, f"data after the end-of-archive blocks (byte {offset + 2 * BLOCK} on)")
            return
        if not _OCTAL_RE.match(h[148:156]) \
                or int(h[148:156].rstrip(b"\0 ").lstrip(b" "), 8) != sum(h[:148]) + 256 + sum(h[156:]):
            raise _refuse(path, f"bad tar header checksum at byte {offset}")
        if h[257:265] not in (b"ustar\x0000", b"ustar  \x00"):
            raise _refuse(path, f"member at byte {offset}: not a USTAR or GNU tar header")
        raw = h[0:100].split(b"\0", 1)[0]
        name = raw.decode("ascii", "replace")
        if h[156:157] != b"0":
            raise _refuse(path, f"member {name[:120]!r} (type {h[156:157]!r}): found a directory, link or extension "
                                "header, expected regular files only")
        if any(h[157:257]) or any(h[345:500]) or h[0:100].rstrip(b"\0") != raw:
            raise _refuse(path, f"member {name[:120]!r}: a link name or a name prefix, expected neither")
        if not _MEMBER_RE.match(name):
            raise _refuse(path, f"member {name[:120]!r}: expected only oci-layout, index.json and blobs/sha256/<hex>")
        if name in seen:
            raise _refuse(path, f"member {name!r} appears twice")
        seen.add(name)
        if not _OCTAL_RE.match(h[124:136]):
            raise _refuse(path, f"member {name!r}: malformed size")
        size = int(h[124:136].rstrip(b"\0 ").lstrip(b" "), 8)
        chunks = _data(f, size, path, name)
        yield name, size, chunks
        for _ in chunks:
            pass
        pad = -size % BLOCK
        if len(f.read(pad)) != pad:
            raise _refuse(path, f"truncated in member {name!r}")
        offset += BLOCK + size + pad


def _data(f: BinaryIO, size: int, path: Path, name: str) -> Iterator[bytes]:
    left = size
    while left:
        chunk = f.read(min(left, CHUNK))
        if not chunk:
            raise _refuse(path, f"truncated in member {name!r}")
        left -= len(chunk)
        yield chunk


def _read_small(chunks: Iterator[bytes], size: int, path: Path, name: str) -> bytes:
    if size > MAX_JSON:
        raise _refuse(path, f"{name}: {size} bytes, more than a document of an image ({MAX_JSON})")
    return b"".join(chunks)


def _json(data: bytes, path: Path, name: str) -> dict[str, Any]:
    from tmplbuild import strictjson

    try:
        doc = strictjson.loads(data, what=name)
    except strictjson.StrictJSONError as exc:
        raise _refuse(path, str(exc)) from None
    if not isinstance(doc, dict):
        raise _refuse(path, f"{name}: expected a JSON object")
    return doc


def _digest_in(descriptor: dict[str, Any], blobs: dict[str, int], path: Path, what: str) -> str:
    digest = descriptor.get("digest")
    if not isinstance(digest, str) or not SHA256_RE.match(digest):
        raise _refuse(path, f"{what}: digest {str(digest)[:80]!r}, expected sha256:<64 hex digits>")
    if digest not in blobs:
        raise _refuse(path, f"{what} {digest} is not in the archive")
    return digest


def _document(small: dict[str, bytes], digest: str, path: Path) -> bytes:
    if digest not in small:
        raise _refuse(path, f"blob {digest}: more than a document of an image ({MAX_JSON} bytes)")
    return small[digest]


def _one(doc: dict[str, Any], key: str, path: Path, name: str) -> dict[str, Any]:
    items = doc.get(key)
    if not isinstance(items, list) or len(items) != 1 or not isinstance(items[0], dict):
        n = len(items) if isinstance(items, list) else "no"
        raise _refuse(path, f"{name}: {key}: found {n} entries, expected exactly one")
    return items[0]


def _differ(path: Path, what: str, observed: Any, expected: Any) -> None:
    if observed != expected:
        raise _refuse(path, f"{what}: found {str(observed)[:200]}, expected {str(expected)[:200]}")


def read_archive(path: Path, on_blob: Callable[[str, bytes], None] | None = None) -> ArchiveInfo:
    """Read an oci-archive strictly (see _members), check every blob's sha256 against its name, oci-layout, and
    that index.json names exactly one manifest, of MEDIA_MANIFEST and its size, whose config and one layer are
    the archive's other blobs. `on_blob(digest, chunk)` sees every blob's bytes as they are read (one pass).
    Raises AuthenticityError (check "oci image"), or LocalIOError when the file cannot be read."""
    members: list[tuple[str, int]] = []
    small: dict[str, bytes] = {}  # oci-layout, index.json and every blob small enough to be a document
    blobs: dict[str, int] = {}
    try:
        with open(path, "rb") as f:
            for name, size, chunks in _members(f, path):
                members.append((name, size))
                if not name.startswith("blobs/"):
                    small[name] = _read_small(chunks, size, path, name)
                    continue
                digest = "sha256:" + name.removeprefix("blobs/sha256/")
                h = hashlib.sha256()
                keep = bytearray() if size <= MAX_JSON else None
                for chunk in chunks:
                    h.update(chunk)
                    if keep is not None:
                        keep += chunk
                    if on_blob is not None:
                        on_blob(digest, chunk)
                _differ(path, f"{name}: sha256", "sha256:" + h.hexdigest(), digest)
                blobs[digest] = size
                if keep is not None:
                    small[digest] = bytes(keep)
    except OSError as exc:
        raise LocalIOError(CHECK, f"{path}: {exc.strerror}") from None
    for needed in ("oci-layout", "index.json"):
        if needed not in small:
            raise _refuse(path, f"no {needed} member")
    _differ(path, "oci-layout", _json(small["oci-layout"], path, "oci-layout"), {"imageLayoutVersion": "1.0.0"})
    index = _json(small["index.json"], path, "index.json")
    entry = _one(index, "manifests", path, "index.json")
    _differ(path, "index.json: the manifest's mediaType", entry.get("mediaType"), MEDIA_MANIFEST)
    manifest_digest = _digest_in(entry, blobs, path, "index.json's manifest")
    _differ(path, "index.json: the manifest's size", entry.get("size"), blobs[manifest_digest])
    manifest = _json(_document(small, manifest_digest, path), path, "manifest")
    config = manifest.get("config")
    if not isinstance(config, dict):
        raise _refuse(path, "the manifest has no config descriptor")
    config_digest = _digest_in(config, blobs, path, "the manifest's config")
    _differ(path, "the manifest's config size", config.get("size"), blobs[config_digest])
    layer = _one(manifest, "layers", path, "manifest")
    layer_digest = _digest_in(layer, blobs, path, "the manifest's layer")
    _differ(path, "the manifest's layer size", layer.get("size"), blobs[layer_digest])
    extra = sorted(set(blobs) - {manifest_digest, config_digest, layer_digest})
    if extra:
        raise _refuse(path, f"blobs the manifest does not name: {', '.join(extra)}")
    return ArchiveInfo(members=tuple(members), index=index, manifest_digest=manifest_digest,
                       manifest_size=blobs[manifest_digest], manifest=manifest, config_digest=config_digest,
                       config=_json(_document(small, config_digest, path), path, "config"), layer_digest=layer_digest,
                       layer_size=blobs[layer_digest])


class _Gunzip:
    """sha256 of a gzip stream's content, streamed in bounded pieces (never whole in memory, nor a bomb's
    worth); one gzip member and nothing after it."""

    def __init__(self) -> None:
        self._d = zlib.decompressobj(31)
        self.sha256 = hashlib.sha256()
        self.error: str | None = None

    def feed(self, data: bytes) -> None:
        if self.error is not None:
            return
        try:
            if self._d.eof:
                self.error = "data after the end of the gzip stream"
                return
            self._inflate(data)
            if self._d.unused_data:
                self.error = "data after the end of the gzip stream"
        except zlib.error as exc:
            self.error = f"not a valid gzip stream ({exc})"

    def _inflate(self, data: bytes) -> None:
        out = self._d.decompress(data, CHUNK)
        self.sha256.update(out)
        # A full piece may leave output pending in zlib even with all input taken: ask until a short one.
        while not self._d.eof and (self._d.unconsumed_tail or len(out) == CHUNK):
            out = self._d.decompress(self._d.unconsumed_tail, CHUNK)
            self.sha256.update(out)

    def finish(self) -> str | None:
        if self.error is None and not self._d.eof:
            self.error = "the gzip stream is truncated"
        return self.error


def verify_archive(path: Path, expected: OciImage) -> None:
    """The check tmplbuild's client runs on an oci-archive it pulled: the structure read_archive checks (members
    exactly oci-layout, index.json and blobs/sha256/<hex>, regular files only, names unique, each blob's sha256
    its name, imageLayoutVersion 1.0.0), index.json naming exactly one manifest, of MEDIA_MANIFEST, and the
    manifest digest and size, platform, config digest, layer digest and size and the diff_id (the gunzipped
    layer's sha256, streamed) equal to `expected`'s. Raises AuthenticityError (exit 3), check "oci image", naming
    the first thing that differs with what was found and what was expected; LocalIOError when unreadable."""
    gunzip = _Gunzip()

    def on_blob(digest: str, chunk: bytes) -> None:
        if digest == expected.layer_digest:
            gunzip.feed(chunk)

    info = read_archive(path, on_blob)
    entry = info.index["manifests"][0]
    _differ(path, "manifest digest", info.manifest_digest, expected.manifest_digest)
    _differ(path, "manifest size", info.manifest_size, expected.manifest_size)
    _differ(path, "index.json: the manifest's platform", entry.get("platform"), expected.platform)
    _differ(path, "config's mediaType", info.manifest["config"].get("mediaType"), MEDIA_CONFIG)
    _differ(path, "config digest", info.config_digest, expected.config_digest)
    _differ(path, "layer mediaType", info.manifest["layers"][0].get("mediaType"), MEDIA_LAYER)
    _differ(path, "layer digest", info.layer_digest, expected.layer_digest)
    _differ(path, "layer size", info.layer_size, expected.layer_size)
    rootfs = info.config.get("rootfs")
    _differ(path, "config: rootfs.diff_ids", rootfs.get("diff_ids") if isinstance(rootfs, dict) else None,
            [expected.diff_id])
    error = gunzip.finish()
    if error is not None:
        raise _refuse(path, f"layer: {error}")
    _differ(path, "diff_id (sha256 of the gunzipped layer)", "sha256:" + gunzip.sha256.hexdigest(), expected.diff_id)


def layer_range(path: Path) -> tuple[int, int]:
    """(offset, size) of the layer's bytes inside the oci-archive `path` (a plain tar, so one contiguous range),
    after read_archive's checks. Raises AuthenticityError, LocalIOError."""
    info = read_archive(path)
    offset = 0
    for name, size in info.members:
        if name == _blob(info.layer_digest):
            return offset + BLOCK, size
        offset += BLOCK + size + (-size % BLOCK)
    raise _refuse(path, "no layer member")  # read_archive found one: unreachable


def assemble(layout: Path, dest: Path, meta: ImageMeta, expected: OciImage) -> None:
    """The oci-archive of the image `expected` from an OCI image layout directory holding it (what `skopeo copy
    docker://REPO@DIGEST oci:DIR` writes from a registry): its manifest, config and layer blobs, each checked
    against `expected` (digests, sizes, the diff_id of the gunzipped layer), written into the same archive the
    build wrote, byte for byte. Raises AuthenticityError (check "oci image") naming the first blob that differs,
    LocalIOError."""
    blobs = layout / "blobs" / "sha256"

    def small(digest: str, size: int, what: str) -> bytes:
        try:
            with open(blobs / digest.removeprefix("sha256:"), "rb") as f:
                data = f.read(MAX_JSON + 1)
        except FileNotFoundError:
            raise _refuse(layout, f"the registry sent no {what} {digest}") from None
        except OSError as exc:
            raise LocalIOError(CHECK, f"{layout}: {exc.strerror}") from None
        _differ(layout, f"{what} {digest}: sha256", _sha256(data), digest)
        _differ(layout, f"{what} size", len(data), size)
        return data

    manifest = small(expected.manifest_digest, expected.manifest_size, "manifest")
    doc = _json(manifest, layout, "manifest")
    config_desc = doc.get("config") if isinstance(doc.get("config"), dict) else {}
    _differ(layout, "config digest", config_desc.get("digest"), expected.config_digest)
    config = small(expected.config_digest, config_desc.get("size", -1), "config")
    layer_desc = _one(doc, "layers", layout, "manifest")
    _differ(layout, "layer digest", layer_desc.get("digest"), expected.layer_digest)
    _differ(layout, "layer mediaType", layer_desc.get("mediaType"), MEDIA_LAYER)
    layer_path = blobs / expected.layer_digest.removeprefix("sha256:")
    gunzip, h, size = _Gunzip(), hashlib.sha256(), 0
    try:
        with open(layer_path, "rb") as f:
            while chunk := f.read(CHUNK):
                h.update(chunk)
                gunzip.feed(chunk)
                size += len(chunk)
    except FileNotFoundError:
        raise _refuse(layout, f"the registry sent no layer {expected.layer_digest}") from None
    except OSError as exc:
        raise LocalIOError(CHECK, f"{layer_path}: {exc.strerror}") from None
    _differ(layout, "layer sha256", "sha256:" + h.hexdigest(), expected.layer_digest)
    _differ(layout, "layer size", size, expected.layer_size)
    error = gunzip.finish()
    if error is not None:
        raise _refuse(layout, f"layer: {error}")
    _differ(layout, "diff_id (sha256 of the gunzipped layer)", "sha256:" + gunzip.sha256.hexdigest(), expected.diff_id)
    try:
        write_archive(dest, meta, manifest, config, layer_path, expected.layer_digest, size)
    except OSError as exc:
        raise LocalIOError(CHECK, f"{dest}: {exc.strerror}") from None


# --- python -m tmplbuild.oci.image ---------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tmplbuild.oci.image",
                                     description="Make a template's oci-archive from its tar or tar.zst.")
    parser.add_argument("tar", type=Path, help="the template: .tar, or .tar.zst")
    parser.add_argument("out", type=Path, help=f"the oci-archive to write: <name>_<version>_<arch>.{FORMAT}")
    parser.add_argument("--name", required=True)
    parser.add_argument("--version", required=True)
    parser.add_argument("--arch", required=True, help="Debian architecture")
    parser.add_argument("--epoch", type=int, required=True, help="SOURCE_DATE_EPOCH")
    parser.add_argument("--description", default="")
    parser.add_argument("--revision", default="", help="the build's input hash")
    args = parser.parse_args(argv)
    try:
        meta = ImageMeta(args.name, args.version, args.arch, args.description, args.revision, args.epoch)
        try:
            src = open(args.tar, "rb")
        except OSError as exc:
            raise LocalIOError(CHECK, f"{args.tar}: {exc.strerror}") from None
        with src:
            if args.tar.suffix == ".zst":
                import zstandard

                try:
                    with open_tar(src, "tar.zst") as reader:
                        image = export(reader, args.out, meta)
                except zstandard.ZstdError as exc:
                    raise UsageError(CHECK, f"{args.tar}: not a readable zstd file ({exc})") from None
            else:
                image = export(src, args.out, meta)
    except TmplbuildError as exc:
        print(f"tmplbuild: {exc}", file=sys.stderr)
        return int(exc.exit_code)
    print(image.manifest_digest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
