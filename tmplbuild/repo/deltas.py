"""Deltas, the publisher's side: when a template version is published next to earlier versions of the same name
and architecture, a delta from each of the last `count` of them to the new tar.zst.

A delta is `zstd --patch-from=BASE.tar TARGET.tar` (the uncompressed tars: between two weekly builds most of
their bytes are the same, while their compressed forms differ from the first change on). A client holding the
base rebuilds the target tar from it and compresses it as the builder did (tmplbuild.zst), then checks the result
against the signed size, sha256 and sha512 of the full file, so a delta can cost time, never trust.

That recompression only gives the signed bytes with the same libzstd and parameters, so before writing any delta
the publisher compresses the target tar itself and compares: a template built with another zstd (or other
settings) gets no deltas, and the publish says so in one line. The index records the parameters and the libzstd
version with each delta (tmplbuild.repo.index.DeltaInfo).

Measured on two real builds of debian-12-minimal five months of updates apart (docs/speed.md, "Deltas"): level
12 gives 4.4 MB for a 53 MB tar.zst in 3.6 s; level 19 saves 10% more bytes in 16 times the time."""
from __future__ import annotations

import hashlib
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import zstandard

from tmplbuild import zst
from tmplbuild.errors import TmplbuildError
from tmplbuild.files import hash_file, sha256_file
from tmplbuild.log import say
from tmplbuild.repo import index as idx

LEVEL = 12
DEFAULT_COUNT = 2  # deltas from the last two earlier versions: a node one or two weekly updates behind
MAX_TAR = 1 << 31  # a delta's window must cover the base tar; zstd's largest on 32-bit hosts is 2^30, ours 2^31
CHUNK = 1 << 20


@dataclass(frozen=True)
class Made:
    """A delta written to `path` (a temporary file), and its index reference."""

    path: Path
    ref: idx.FileRef


def bases(current: idx.Index, name: str, version: str, arch: str, created: str, count: int) -> list[idx.Entry]:
    """The earlier versions to write deltas from: same name and arch, with a tar.zst, older than the new one (by
    created, then version), newest first, at most `count`."""
    def key(e: idx.Entry) -> tuple[int, str]:
        try:
            return idx.parse_stamp(e.created), e.version
        except ValueError:
            return 0, e.version

    try:
        mine = (idx.parse_stamp(created), version)
    except ValueError:
        return []
    earlier = [e for e in current.templates if e.name == name and e.arch == arch and e.version != version
               and e.files[0].format == "tar.zst" and key(e) < mine]
    return sorted(earlier, key=key, reverse=True)[:max(count, 0)]


BaseFile = Callable[[idx.FileRef], Path]  # where a published base file is (a local path, or a verified download)


def make(base_file: BaseFile, directory: Path, entry_key: tuple[str, str, str], target: Path, target_sha256: str,
         level_used: int, base_entries: list[idx.Entry], level: int = LEVEL) -> list[Made]:
    """Deltas from each of `base_entries` (their tar.zst found by `base_file`) to `target`, the new tar.zst, written as
    hidden temporary files in `directory`. Returns what was made; a delta that cannot be made (no zstd command, a
    base file that does not match the index, a target this libzstd does not reproduce) is left out with one line
    saying why: deltas are an optimisation, and the publish goes on without them. The caller removes the
    returned files when its own publish fails."""
    if not base_entries:
        return []
    name, version, arch = entry_key
    label = f"{name} {version} {arch}"
    if shutil.which("zstd") is None:
        say(f"deltas: no zstd command here (Debian's zstd package); {label} is published without deltas")
        return []
    made: list[Made] = []
    with tempfile.TemporaryDirectory(prefix="tmplbuild-delta-") as tmp:
        target_tar = Path(tmp) / "target.tar"
        try:
            tar_size = _decompress(target, target_tar)
            if tar_size > MAX_TAR:
                say(f"deltas: {label}'s tar is {tar_size} bytes, more than the {MAX_TAR} a delta covers; "
                    "published without deltas")
                return []
            if _recompressed_sha256(target_tar, level_used) != target_sha256:
                say(f"deltas: libzstd {zst.version()} at level {level_used} does not give {target.name}'s bytes "
                    f"(built with another zstd or other settings), so a client could not rebuild it; {label} is "
                    "published without deltas")
                return []
        except (OSError, zstandard.ZstdError) as exc:
            say(f"deltas: {target.name}: {exc}; {label} is published without deltas")
            return []
        for base in base_entries:
            ref = base.files[0]
            base_tar = Path(tmp) / "base.tar"
            out = directory / f".{idx.delta_file_name(name, version, arch, base.version)}.part"
            try:
                base_path = base_file(ref)
                if sha256_file(base_path) != ref.sha256:
                    say(f"deltas: {ref.path} does not match its signed sha256; no delta from {base.version}")
                    continue
                base_size = _decompress(base_path, base_tar)
                if base_size > MAX_TAR:
                    continue
                window = max(zst.WINDOW_LOG, max(base_size, tar_size).bit_length())
                proc = subprocess.run(["zstd", "-q", "-f", f"-{level}", f"--long={window}",
                                       f"--patch-from={base_tar}", str(target_tar), "-o", str(out)],
                                      capture_output=True, text=True)
                if proc.returncode != 0:
                    out.unlink(missing_ok=True)
                    say(f"deltas: zstd --patch-from failed ({proc.stderr.strip()[-200:]}); no delta from "
                        f"{base.version}")
                    continue
                size, sha256, sha512 = hash_file(out)
            except (OSError, zstandard.ZstdError, TmplbuildError) as exc:
                out.unlink(missing_ok=True)
                say(f"deltas: no delta from {base.version}: {exc}")
                continue
            finally:
                base_tar.unlink(missing_ok=True)
            info = idx.DeltaInfo(base_version=base.version, base_size=ref.size, base_sha256=ref.sha256,
                                 tar_size=tar_size, zstd_version=zst.version(), zstd_level=level_used,
                                 zstd_window_log=zst.WINDOW_LOG)
            rel = f"templates/{name}/{version}/{idx.delta_file_name(name, version, arch, base.version)}"
            made.append(Made(out, idx.FileRef(rel, size, sha256, sha512, idx.DELTA_FORMAT, info)))
    return made


def _decompress(src: Path, dest: Path) -> int:
    with open(src, "rb") as fin, open(dest, "wb") as fout:
        _, written = zstandard.ZstdDecompressor(max_window_size=1 << 31).copy_stream(fin, fout, CHUNK, CHUNK)
    return written


def _recompressed_sha256(tar: Path, level: int) -> str:
    h = hashlib.sha256()

    class Sink:
        def write(self, data: bytes) -> int:
            h.update(data)
            return len(data)

    with open(tar, "rb") as fin, zst.compressor(level).stream_writer(Sink(), write_size=CHUNK,  # type: ignore[arg-type]
                                                                      closefd=False) as w:
        while chunk := fin.read(CHUNK):
            w.write(chunk)
    return h.hexdigest()
