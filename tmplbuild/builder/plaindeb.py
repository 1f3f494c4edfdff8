"""A verified .deb with its members decompressed, for a build whose dpkg runs under emulation.

Under qemu-user the chroot's dpkg-deb decompresses every package's data.tar.xz as emulated code: for the shipped
debian-12-minimal on arm64 that was 17 s of the build (2.6 s natively). The builder therefore hands such a build's
debootstrap the same packages with `control.tar` and `data.tar` stored uncompressed, which dpkg reads since 1.17.6,
decompressed here, natively, after the original .deb's sha256 was checked against the signed index. The member
contents are the same bytes, so the installed tree is the same: the tests compare the template built this way
with one built from the original files, byte for byte.

A .deb is an ar archive: "!<arch>\\n", then per member a 60-byte header (name 16, mtime 12, uid 6, gid 6, mode 8,
size 10, "`\\n"), the data, and a newline pad to an even offset. dpkg requires debian-binary, then control.tar*,
then data.tar*; this keeps that order and each member's header fields except its name and size.
"""
from __future__ import annotations

import bz2
import gzip
import lzma
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, Iterator

import zstandard

from tmplbuild.errors import BuildError

MAGIC = b"!<arch>\n"
HEADER = 60
CHUNK = 1 << 20


def _zstd_reader(f):
    return zstandard.ZstdDecompressor().stream_reader(f, read_size=CHUNK, read_across_frames=True)


# member suffix -> a reader of the decompressed stream
DECOMPRESSORS: dict[str, Callable] = {
    ".xz": lambda f: lzma.open(f),
    ".gz": lambda f: gzip.open(f),
    ".bz2": lambda f: bz2.open(f),
    ".zst": _zstd_reader,
}


class _Member:
    def __init__(self, header: bytes, offset: int, size: int) -> None:
        self.header, self.offset, self.size = header, offset, size
        self.name = header[:16].decode("ascii", "replace").rstrip(" ").rstrip("/")


def _members(f) -> Iterator[_Member]:
    if f.read(len(MAGIC)) != MAGIC:
        raise ValueError("not an ar archive")
    while True:
        header = f.read(HEADER)
        if not header:
            return
        if len(header) != HEADER or header[58:60] != b"`\n":
            raise ValueError("truncated or corrupt ar member header")
        size = int(header[48:58].decode("ascii").strip())
        member = _Member(header, f.tell(), size)
        yield member
        f.seek(member.offset + size + (size & 1))


def _header(old: bytes, name: str, size: int) -> bytes:
    return name.encode("ascii").ljust(16) + old[16:48] + str(size).encode("ascii").ljust(10) + b"`\n"


class _Window:
    """A read-only file view of one member: what the decompressors read from."""

    def __init__(self, f, offset: int, size: int) -> None:
        self.f, self.pos, self.end = f, offset, offset + size

    def read(self, n: int = -1) -> bytes:
        n = self.end - self.pos if n is None or n < 0 else min(n, self.end - self.pos)
        self.f.seek(self.pos)
        data = self.f.read(n)
        self.pos += len(data)
        return data

    def readable(self) -> bool:
        return True


def decompress(src: Path, dst: Path) -> None:
    """Write `dst`: the .deb `src` with each compressed control.tar/data.tar member stored plain."""
    with open(src, "rb") as f, open(dst, "wb") as out:
        out.write(MAGIC)
        for m in list(_members(f)):
            stem, dot, suffix = m.name.rpartition(".")
            opener = DECOMPRESSORS.get(f".{suffix}") if stem in ("control.tar", "data.tar") else None
            if opener is None:
                f.seek(m.offset)
                data = f.read(m.size)
                out.write(m.header + data + (b"\n" if m.size & 1 else b""))
                continue
            start = out.tell()
            out.write(b"\0" * HEADER)  # rewritten once the size is known
            size = 0
            with opener(_Window(f, m.offset, m.size)) as plain:
                while chunk := plain.read(CHUNK):
                    out.write(chunk)
                    size += len(chunk)
            if size & 1:
                out.write(b"\n")
            end = out.tell()
            out.seek(start)
            out.write(_header(m.header, stem, size))
            out.seek(end)


def decompress_all(pairs: Iterable[tuple[Path, Path]], jobs: int | None = None) -> None:
    """Decompress each (verified .deb, destination) pair, on every core (lzma and zlib release the GIL).
    Raises BuildError naming the first package that could not be read."""
    pairs = list(pairs)

    def one(pair: tuple[Path, Path]) -> None:
        src, dst = pair
        try:
            decompress(src, dst)
        except (OSError, ValueError, EOFError, lzma.LZMAError, zstandard.ZstdError) as exc:
            dst.unlink(missing_ok=True)
            raise BuildError("bootstrap", f"{src.name}: cannot decompress its members: {exc}") from None

    with ThreadPoolExecutor(max_workers=jobs or os.cpu_count() or 1) as pool:
        # Largest first, so the last package to finish is a small one.
        for _ in pool.map(one, sorted(pairs, key=lambda p: -p[0].stat().st_size)):
            pass
