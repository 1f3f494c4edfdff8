"""The tar.zst's compression, in one place. The builder writes it (tmplbuild.builder.pack), and a client that
rebuilds a template from a delta (tmplbuild.client.delta) writes it again: the two must give the same bytes, so
both take their compressor from here.

Level 9 with long-distance matching over a 2^27 window, multi-threaded (its output is the same for any number of
worker threads), with a checksum; chosen with bench/build.py (docs/speed.md, "Compression"): 13% larger than
xz -6 in 4% of its time. The window stays at 2^27 because plain `zstd -d` (and so `tar --zstd`, pct, lxc) refuses
larger windows without extra flags."""
from __future__ import annotations

import zstandard

LEVEL = 9
WINDOW_LOG = 27


def version() -> str:
    """The libzstd version these parameters run on ("1.5.7"): python-zstandard's bundled library. Another version
    may compress the same input into other bytes."""
    return ".".join(str(n) for n in zstandard.ZSTD_VERSION)


def compressor(level: int = LEVEL, window_log: int = WINDOW_LOG) -> zstandard.ZstdCompressor:
    """Multi-threaded, one worker per core: zstd's multi-threaded format gives the same bytes for any number of
    workers from 1 up (measured: one worker costs as much CPU here, in 1.5 times the time)."""
    params = zstandard.ZstdCompressionParameters(compression_level=level, enable_ldm=True, window_log=window_log,
                                                 threads=-1, write_checksum=True)
    return zstandard.ZstdCompressor(compression_params=params)
