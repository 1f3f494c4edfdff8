#!/usr/bin/env python3
"""What making a template's OCI image costs over plain `gzip -n -6`.

Given a template .tar.zst (default: debian-12-minimal, built now with `python -m tmplbuild build`, which needs root
and about a minute), it is decompressed once to a plain .tar in a scratch directory on disk, then the median of
--repeat runs (alternating, so both see the same page cache and CPU clock) of:
  gzip:      gzip -n -6 -c TAR > OUT.gz                  (GNU gzip, one core: the bare minimum for a gzip layer)
  tmplbuild: python -m tmplbuild.oci.image TAR OUT.oci.tar --name N --version V --arch A --epoch E
             (the whole process, Python start-up included: zlib level 6 on a background thread, sha256 of the tar
             and of the gzip, the tar's names checked, the oci-archive written)
Goal: tmplbuild <= 1.1x gzip. For scale it also times the same command from the .tar.zst (zstd decompression in
the reading thread, what `tmplbuild oci export` of a published template does) and Python's start-up with the
import alone. Every run's manifest digest must be the same: the table says so.

    python3 bench/oci_export.py [TEMPLATE.tar.zst] [--repeat N] [--json FILE]"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))  # the package is run from its checkout, not installed

import zstandard  # noqa: E402

from build import markdown, plain  # noqa: E402  (bench/build.py: the same tables)
from tmplbuild.oci.image import FORMAT, GZIP_LEVEL  # noqa: E402

RECIPE = "debian-12-minimal"
GOAL = 1.10  # tmplbuild's whole process against gzip -n -6
STEM_RE = re.compile(r"\A(?P<name>[^_]+)_(?P<version>[^_]+)_(?P<arch>[^_.]+)\.tar\.zst\Z")
CHUNK = 1 << 20


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)  # progress on stderr so stdout holds only the table


def timed(argv: list[str], stdout: Path | None = None) -> tuple[float, bytes]:
    """Whole-process seconds of argv, and what it printed (unless stdout goes to a file). Exits on failure."""
    with open(stdout, "wb") if stdout else tempfile.TemporaryFile() as out:
        start = time.monotonic()
        proc = subprocess.run(argv, stdout=out, stderr=subprocess.PIPE, cwd=PROJECT)
        secs = time.monotonic() - start
        printed = b""
        if not stdout:
            out.seek(0)
            printed = out.read()
    if proc.returncode != 0:
        log(f"FAILED ({proc.returncode}): {' '.join(argv)}\n{proc.stderr.decode(errors='replace')}")
        sys.exit(1)
    return secs, printed


def build_template(session: Path) -> Path:
    if os.geteuid() != 0:
        log("bench/oci_export.py: no template given, and building one needs root")
        sys.exit(2)
    out = session / "built"
    log(f"building {RECIPE} (about a minute) ...")
    subprocess.run([sys.executable, "-m", "tmplbuild", "build", RECIPE, "--out", str(out)], cwd=PROJECT, check=True,
                   stdout=subprocess.DEVNULL)
    return next(out.glob("*.tar.zst"))


def metadata(template: Path) -> dict[str, str]:
    """name, version, arch and epoch: from the manifest next to the template, else from its file name."""
    m = STEM_RE.match(template.name)
    meta = {"name": m["name"], "version": m["version"], "arch": m["arch"]} if m else \
        {"name": "bench", "version": "1", "arch": "amd64"}
    meta["epoch"] = "0"
    manifest = template.with_name(template.name.removesuffix(".tar.zst") + ".manifest.json")
    if manifest.is_file():
        doc = json.loads(manifest.read_text())
        meta.update(name=doc["name"], version=doc["version"], arch=doc["arch"],
                    epoch=str(doc.get("source_date_epoch") or 0))
    return meta


def decompress(template: Path, tar: Path) -> None:
    with open(template, "rb") as src, open(tar, "wb") as dst:
        zstandard.ZstdDecompressor().copy_stream(src, dst, read_size=CHUNK, write_size=CHUNK)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("template", type=Path, nargs="?", help=f"a .tar.zst (default: build {RECIPE})")
    ap.add_argument("--repeat", type=int, default=5, help="runs per row; the table shows medians (default 5)")
    ap.add_argument("--json", type=Path, help="write raw results here")
    args = ap.parse_args()
    if args.repeat < 1:
        ap.error("--repeat must be at least 1")
    if args.template and not args.template.is_file():
        ap.error(f"{args.template}: no such file")
    # /var/tmp is on disk; /tmp may be a tmpfs, which would flatter both sides differently.
    session = Path(tempfile.mkdtemp(prefix="tmplbuild-bench-oci-", dir="/var/tmp"))
    try:
        template = args.template or build_template(session)
        meta = metadata(template)
        tar = session / "template.tar"
        log(f"decompressing {template.name} ...")
        decompress(template, tar)
        tar_size = tar.stat().st_size
        gz, oci = session / "out.tar.gz", session / f"out.{FORMAT}"
        ours = [sys.executable, "-m", "tmplbuild.oci.image"]
        opts = ["--name", meta["name"], "--version", meta["version"], "--arch", meta["arch"], "--epoch", meta["epoch"]]
        rows_argv = {
            f"gzip -n -{GZIP_LEVEL}": (["gzip", "-n", f"-{GZIP_LEVEL}", "-c", str(tar)], gz),
            "tmplbuild (.tar)": ([*ours, str(tar), str(oci), *opts], None),
            "tmplbuild (.tar.zst, for scale)": ([*ours, str(template), str(oci), *opts], None),
            "python start-up + import (for scale)": ([sys.executable, "-c", "import tmplbuild.oci.image"], None),
        }
        runs: dict[str, list[float]] = {row: [] for row in rows_argv}
        digests: set[bytes] = set()
        sizes: dict[str, int] = {}
        for n in range(args.repeat):
            log(f"round {n + 1}/{args.repeat}")
            for row, (argv, stdout) in rows_argv.items():
                gz.unlink(missing_ok=True)
                oci.unlink(missing_ok=True)
                secs, printed = timed(argv, stdout)
                runs[row].append(secs)
                if row.startswith("tmplbuild"):
                    digests.add(printed.strip())
                    sizes[row] = oci.stat().st_size
                elif stdout is not None:
                    sizes[row] = stdout.stat().st_size
                log(f"    {row}: {secs:.2f} s")
    finally:
        shutil.rmtree(session, ignore_errors=True)

    medians = {row: statistics.median(v) for row, v in runs.items()}
    base = medians[f"gzip -n -{GZIP_LEVEL}"]
    ratio = medians["tmplbuild (.tar)"] / base
    header = ["command", "MB out", "median s", "min s", "max s", f"vs gzip -{GZIP_LEVEL}"]
    rows = [[row, f"{sizes[row] / 1e6:.1f}" if row in sizes else "", f"{medians[row]:.2f}", f"{min(v):.2f}",
             f"{max(v):.2f}", f"{medians[row] / base:.3f}x"] for row, v in runs.items()]
    title = (f"{template.name} ({tar_size / 1e6:.1f} MB tar), median of {args.repeat}; goal: tmplbuild (.tar) <= "
             f"{GOAL:.2f}x gzip -n -{GZIP_LEVEL}: {'met' if ratio <= GOAL else 'MISSED'} ({ratio:.3f}x); "
             f"manifest digest the same in every run: {'yes' if len(digests) == 1 else 'NO'} "
             f"({b', '.join(sorted(digests)).decode()})")
    print(f"\n{title}\n{plain(header, rows)}\n\nMarkdown:\n\n{markdown(header, rows)}")
    if args.json:
        args.json.write_text(json.dumps({"template": str(template), "meta": meta, "repeat": args.repeat,
                                         "runs": runs, "median": medians, "sizes": sizes, "ratio": ratio,
                                         "goal": GOAL, "tar_bytes": tar_size,
                                         "digests": sorted(d.decode() for d in digests)}, indent=2))
        log(f"wrote {args.json}")
    return 0 if ratio <= GOAL and len(digests) == 1 else 1


if __name__ == "__main__":
    sys.exit(main())
