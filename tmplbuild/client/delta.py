"""Deltas, the client's side: a tar.zst rebuilt from an earlier version a node already holds plus a delta, then
checked like a full download.

1. The base: a regular file in the destination (or the node's template cache) named like the template's tar.zst
   whose size and sha256 are those the signed index gives for a delta's base.
2. The delta: downloaded as any file is (tmplbuild.client.download.install: capped at its signed size, hashed
   while it arrives, resumed after a transport failure) into a hidden file of the destination.
3. The rebuild: the base decompressed, the delta applied to it (a zstd frame whose dictionary is the base tar),
   the tar compressed again as the builder did (tmplbuild.zst, with the signed level), into a hidden `.rebuild`
   file, never longer than the signed size, hashed while it is written.
4. The check: size, sha256 and sha512 of the full file, as signed; only then the rename into place.

Anything that goes wrong on the way (no base, another libzstd, a delta that does not verify, a result that is not
the signed file, a full disk) is a DeltaFailed with a one-line reason: the caller says it and downloads the whole
file instead. Nothing unverified is ever renamed into place, and the hidden files are removed (but a delta's
`.part` kept after a transport failure, which the next fetch resumes)."""
from __future__ import annotations

import fcntl
import os
import re
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tmplbuild import zst
from tmplbuild.client import trust
from tmplbuild.client.download import Hasher, Progress, install
from tmplbuild.errors import TmplbuildError
from tmplbuild.files import fsync_path, sha256_file
from tmplbuild.repo import index as idx
from tmplbuild.transport import Transport

CHUNK = 1 << 20
MAX_WINDOW = 1 << 31  # the largest window a delta may ask for (its frame header): the publisher's MAX_TAR


class DeltaFailed(Exception):
    """Why a delta was not used; str() is the one-line reason."""


@dataclass(frozen=True)
class Applied:
    status: str  # "fetched" or "replaced", as install() says
    delta: idx.FileRef
    base: Path


def _name_re(entry: idx.Entry) -> re.Pattern[str]:
    return re.compile(rf"\A{re.escape(entry.name)}_[0-9A-Za-z][0-9A-Za-z.+~-]*_{re.escape(entry.arch)}\.tar\.zst\Z")


def find_base(entry: idx.Entry, dirs: Iterable[Path]) -> tuple[idx.FileRef, Path] | None:
    """The first of the entry's deltas (newest base first, as listed) whose base is a file in `dirs`: a regular
    file named like this template's tar.zst with the signed base size and sha256. The file named after the base
    version is tried first; other versions' names are hashed only when their size matches."""
    deltas = [d for d in entry.deltas if d.delta is not None]
    if not deltas:
        return None
    pattern = _name_re(entry)
    candidates: list[Path] = []
    for d in dirs:
        try:
            names = sorted(os.listdir(d))
        except OSError:
            continue
        candidates += [d / n for n in names if pattern.match(n)]
    hashed: dict[Path, str] = {}
    for ref in deltas:
        info = ref.delta
        assert info is not None
        preferred = f"{entry.name}_{info.base_version}_{entry.arch}.tar.zst"
        for path in sorted(candidates, key=lambda p: p.name != preferred):
            try:
                st = os.stat(path, follow_symlinks=False)
            except OSError:
                continue
            if not stat.S_ISREG(st.st_mode) or st.st_size != info.base_size:
                continue
            if path not in hashed:
                try:
                    hashed[path] = sha256_file(path)  # a base's sha512 is not signed
                except OSError:
                    continue
            if hashed[path] == info.base_sha256:
                return ref, path
    return None


def check_delta(entry: idx.Entry, ref: idx.FileRef) -> None:
    """A delta listed by an entry must be named after it and its base, in its directory, with a sha512.
    Raises DeltaFailed."""
    info = ref.delta
    if info is None or ref.format != idx.DELTA_FORMAT or not ref.sha512:
        raise DeltaFailed(f"{ref.path}: not a delta with its hashes")
    expected = f"{entry.directory}/{idx.delta_file_name(entry.name, entry.version, entry.arch, info.base_version)}"
    if ref.path != expected:
        raise DeltaFailed(f"delta {ref.path}, expected {expected}")


def apply(transport: Transport, url: str, entry: idx.Entry, target: idx.FileRef, ref: idx.FileRef, base: Path,
          dest: Path, filename: str, progress: bool | None) -> Applied:
    """Download the delta `ref` (at `url`), rebuild `target` (the entry's tar.zst) from `base`, check it and
    rename it to dest/filename. Raises DeltaFailed (the caller falls back to the full download), and
    KeyboardInterrupt as it comes."""
    import zstandard

    info = ref.delta
    assert info is not None
    check_delta(entry, ref)
    if info.zstd_version != zst.version():
        raise DeltaFailed(f"the template was compressed with libzstd {info.zstd_version} and this tmplbuild has "
                          f"{zst.version()}, which may give other bytes")
    delta_name = f".{filename}.delta"
    final = dest / filename
    replacing = os.path.lexists(final)
    rebuild = dest / f".{filename}.rebuild"
    try:
        install(transport, url, ref, dest, delta_name, Progress(Path(ref.path).name, ref.size, enabled=progress))
    except TmplbuildError as exc:
        raise DeltaFailed(str(exc)) from None
    try:
        fd = os.open(rebuild, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        (dest / delta_name).unlink(missing_ok=True)
        raise DeltaFailed(f"cannot write {rebuild}: {exc.strerror}") from None
    out = os.fdopen(fd, "r+b")
    ok = False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DeltaFailed(f"{rebuild}: another tmplbuild fetch is writing it") from None
        out.truncate(0)
        sink = _Capped(out, target.size)
        try:
            with open(base, "rb") as f:
                base_tar = zstandard.ZstdDecompressor(max_window_size=MAX_WINDOW).decompressobj(
                    read_across_frames=True).decompress(f.read())
            dictionary = zstandard.ZstdCompressionDict(base_tar, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
            decoder = zstandard.ZstdDecompressor(dict_data=dictionary, max_window_size=MAX_WINDOW)
            tar_size = 0
            with open(dest / delta_name, "rb") as fdelta, decoder.stream_reader(fdelta, read_size=CHUNK) as reader, \
                    zst.compressor(info.zstd_level, info.zstd_window_log).stream_writer(
                        sink, write_size=CHUNK, closefd=False) as writer:  # type: ignore[arg-type]
                while chunk := reader.read(CHUNK):
                    tar_size += len(chunk)
                    if tar_size > info.tar_size:
                        raise DeltaFailed(f"the delta gives more than the signed {info.tar_size} bytes of tar")
                    writer.write(chunk)
            if tar_size != info.tar_size:
                raise DeltaFailed(f"the delta gives {tar_size} bytes of tar, expected the signed {info.tar_size}")
            out.flush()
            os.fsync(fd)
            sha256, sha512 = sink.hasher.hexdigests()
            trust.check_file(target, sink.size, sha256, sha512, f"{filename} (rebuilt from a delta)")
        except DeltaFailed:
            raise
        except zstandard.ZstdError as exc:
            raise DeltaFailed(f"applying the delta to {base.name}: {exc}") from None
        except (TmplbuildError, OSError, MemoryError) as exc:
            raise DeltaFailed(str(exc) if not isinstance(exc, OSError) else f"{rebuild}: {exc.strerror or exc}") \
                from None
        finally:
            sink.hasher.close()
        try:
            os.replace(rebuild, final)
            fsync_path(dest, directory=True)
        except OSError as exc:
            raise DeltaFailed(f"cannot rename {rebuild} to {final}: {exc.strerror}") from None
        ok = True
    finally:
        out.close()
        if not ok:
            rebuild.unlink(missing_ok=True)
        (dest / delta_name).unlink(missing_ok=True)
    return Applied("replaced" if replacing else "fetched", ref, base)


class _Capped:
    """The rebuilt tar.zst's sink: written to the file and hashed, refused past the signed size."""

    def __init__(self, f, cap: int) -> None:
        self.f, self.cap, self.size = f, cap, 0
        self.hasher = Hasher()

    def write(self, data: bytes) -> int:
        self.size += len(data)
        if self.size > self.cap:
            raise DeltaFailed(f"the rebuilt file is longer than the signed {self.cap} bytes")
        self.f.write(data)
        self.hasher.update(data)
        return len(data)
