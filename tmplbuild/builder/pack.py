"""Deterministic tar and its compressed forms.

The same tree always gives the same bytes: entries sorted by name, mtimes clamped to SOURCE_DATE_EPOCH and
written as integers (tarfile adds a pax header per file for a float mtime), numeric owners only (user and
group names would come from the build host), hard links kept as links, file capabilities kept."""
from __future__ import annotations

import os
import stat
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from tmplbuild import zst
from tmplbuild.errors import LocalIOError
from tmplbuild.files import hash_file
from tmplbuild.oci.image import ImageMeta, LayerSink, OciImage
from tmplbuild.recipe.model import Compression

CHUNK = 1 << 20
# The tar.zst's compressor and its default level: tmplbuild.zst, which a client rebuilding from a delta shares.
ZSTD_LEVEL = zst.LEVEL
ZSTD_WINDOW_LOG = zst.WINDOW_LOG
# xz for the hosts that read nothing else (lxc-create -t local, systemd 252): level 0, chosen with bench/build.py
# (docs/speed.md, "Compression"): -6 took 28 s of a 12 s warm build; 0 takes about 4 s on two cores in parallel with
# zstd. Always in multi-threaded mode (at least 2 threads), whose block layout depends on the level only: the
# same bytes on a 1-core and a 64-core builder.
XZ_LEVEL = 0
KEPT_XATTRS = ("security.capability",)  # ping and friends need it; other xattrs are build-host noise


@dataclass(frozen=True)
class Artifact:
    path: Path
    format: str  # a file format of tmplbuild.repo.index.FORMATS: "tar.zst", "tar.xz", "lxc-meta.tar.xz", "oci.tar"
    size: int
    sha256: str
    sha512: str
    oci: OciImage | None = None  # for "oci.tar": the image's digests


def write_tar(root: Path, out: BinaryIO, epoch: int) -> tuple[int, int]:
    """Write root as a tarball to the stream `out`. Returns (entries, bytes of file content)."""
    inodes: dict[tuple[int, int], str] = {}
    entries = content = 0
    with tarfile.open(
        fileobj=out, mode="w|", format=tarfile.PAX_FORMAT, encoding="utf-8", copybufsize=CHUNK
    ) as tar:
        for rel, path in _walk(root):
            st = os.lstat(path)
            info = tarfile.TarInfo(rel)
            info.mode = stat.S_IMODE(st.st_mode)
            info.uid, info.gid = st.st_uid, st.st_gid
            info.uname = info.gname = ""
            info.mtime = min(int(st.st_mtime), epoch)
            pax = _xattrs(path)
            if pax:
                info.pax_headers = pax
            fileobj = None
            key = (st.st_dev, st.st_ino)
            if stat.S_ISREG(st.st_mode) and st.st_nlink > 1 and key in inodes:
                info.type, info.linkname = tarfile.LNKTYPE, inodes[key]
            elif stat.S_ISREG(st.st_mode):
                if st.st_nlink > 1:
                    inodes[key] = rel
                info.size = st.st_size
                fileobj = open(path, "rb")
                content += st.st_size
            elif stat.S_ISDIR(st.st_mode):
                info.type = tarfile.DIRTYPE
            elif stat.S_ISLNK(st.st_mode):
                info.type, info.linkname = tarfile.SYMTYPE, os.readlink(path)
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                info.type = tarfile.CHRTYPE if stat.S_ISCHR(st.st_mode) else tarfile.BLKTYPE
                info.devmajor, info.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
            elif stat.S_ISFIFO(st.st_mode):
                info.type = tarfile.FIFOTYPE
            else:
                continue  # sockets cannot be archived and are meaningless in a template
            try:
                tar.addfile(info, fileobj)
            finally:
                if fileobj:
                    fileobj.close()
            entries += 1
    return entries, content


def _walk(root: Path):
    """(archive name, path), depth-first in name order like `tar --sort=name`, with './' names like other
    rootfs templates."""
    yield ".", str(root)
    yield from _walk_dir(str(root), "./")


def _walk_dir(dir_path: str, prefix: str):
    with os.scandir(dir_path) as it:
        entries = sorted((e.name, e.is_dir(follow_symlinks=False)) for e in it)
    for name, is_dir in entries:
        path = os.path.join(dir_path, name)
        yield prefix + name, path
        if is_dir:
            yield from _walk_dir(path, f"{prefix}{name}/")


def _xattrs(path: str) -> dict[str, str]:
    out = {}
    for name in KEPT_XATTRS:
        try:
            value = os.getxattr(path, name, follow_symlinks=False)
        except OSError:
            continue
        out[f"SCHILY.xattr.{name}"] = value.decode("latin-1")
    return out


class _Tee:
    """One tar stream into every compressor at once: no intermediate tar on disk, and packing overlaps
    compression (zstd and xz run in their own threads and processes)."""

    def __init__(self, sinks: list[BinaryIO]) -> None:
        self.sinks = sinks

    def write(self, data: bytes) -> int:
        for sink in self.sinks:
            sink.write(data)
        return len(data)


def pack(root: Path, outputs: list[tuple[Compression, Path]], epoch: int,
         zstd_level: int = ZSTD_LEVEL, xz_level: int = XZ_LEVEL,
         oci: ImageMeta | None = None) -> tuple[int, int, list[Artifact]]:
    """Pack root into each (format, path) of outputs; an OCI output (tmplbuild.oci.image) needs `oci`, the image's
    metadata. Returns (entries, content bytes, artifacts). On any failure no output file exists afterwards.
    Raises LocalIOError on a write failure (disk full), xz's own included."""
    files: list[BinaryIO] = []
    procs: list[subprocess.Popen[bytes]] = []
    layers: list[LayerSink] = []
    try:
        sinks: list[BinaryIO] = []
        for fmt, dest in outputs:
            if fmt is Compression.OCI:
                if oci is None:
                    raise ValueError("an OCI output needs its ImageMeta")
                layers.append(LayerSink(dest, oci))
                sinks.append(layers[-1])  # type: ignore[arg-type]
                continue
            f = open(dest, "wb")
            files.append(f)
            if fmt is Compression.ZSTD:
                sinks.append(zst.compressor(zstd_level).stream_writer(f, write_size=CHUNK, closefd=False))
            else:
                threads = max(2, os.cpu_count() or 1)
                proc = subprocess.Popen(["xz", f"-{xz_level}", f"-T{threads}", "-c"], stdin=subprocess.PIPE, stdout=f,
                                        stderr=subprocess.PIPE)
                procs.append(proc)
                sinks.append(proc.stdin)  # type: ignore[arg-type]
        entries, content = write_tar(root, _Tee(sinks), epoch)  # type: ignore[arg-type]
        for sink in sinks:
            sink.close()  # ends the zstd frame; EOF for xz
        for proc in procs:
            err = proc.stderr.read() if proc.stderr else b""
            if proc.wait() != 0:  # xz reads a pipe: it fails only on its own output or memory (exit 7)
                said = err.decode(errors="replace").strip()
                raise LocalIOError("compress", said.splitlines()[-1] if said else f"xz exited {proc.returncode}")
        for f in files:
            f.close()
        images = iter(layer.image for layer in layers)
        artifacts = [Artifact(dest, fmt.file_format, *hash_file(dest),
                              oci=next(images) if fmt is Compression.OCI else None) for fmt, dest in outputs]
    except BaseException as exc:
        # A write into xz's pipe fails with EPIPE when xz has exited, usually because its own write failed (a full
        # disk): its stderr, not "Broken pipe", says why.
        xz_said = _exited_xz_reason(procs) if isinstance(exc, BrokenPipeError) else ""
        for proc in procs:
            proc.kill()
            proc.wait()
        for f in files:
            f.close()
        for layer in layers:
            layer.abort()
        for _, dest in outputs:
            dest.unlink(missing_ok=True)
        if xz_said:
            raise LocalIOError("compress", xz_said) from None
        if isinstance(exc, OSError):
            raise LocalIOError("compress", f"{exc.filename or outputs[0][1]}: {exc.strerror}") from None
        raise
    return entries, content, artifacts


def _exited_xz_reason(procs: list[subprocess.Popen[bytes]]) -> str:
    """The last line of stderr of an xz that has exited with an error ("" if none has)."""
    for proc in procs:
        try:
            code = proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            continue
        err = proc.stderr.read().decode(errors="replace").strip() if proc.stderr else ""
        if code != 0:
            return err.splitlines()[-1] if err else f"xz exited {code}"
    return ""
