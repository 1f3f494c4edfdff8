#!/usr/bin/env python3
"""What the OCI image costs a build: the shipped debian-12-minimal (formats tar.zst, tar.xz and oci) against the
same recipe without "oci", both warm (the package cache filled by a first, untimed build), alternating, the whole
`tmplbuild build` process each time. Goal: at most 1.3x.

Run as root: python3 bench/oci_build.py [--repeat N] [--cache-dir DIR]. See bench/README.md."""
from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
RECIPE = "debian-12-minimal"
NO_OCI = f"{RECIPE}-no-oci"
GOAL = 1.3


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def recipes(session: Path) -> tuple[Path, Path]:
    """The shipped recipe, and a child of it that only drops "oci" from its formats."""
    d = session / "recipes"
    d.mkdir()
    shutil.copy(PROJECT / "recipes" / f"{RECIPE}.toml", d / f"{RECIPE}.toml")
    shutil.copytree(PROJECT / "recipes" / "files", d / "files")  # a recipe reads only inside its own directory
    child = d / f"{NO_OCI}.toml"
    child.write_text(f'extends = "{RECIPE}"\n\n[template]\nname = "{NO_OCI}"\nformats = ["tar.zst", "tar.xz"]\n')
    return d / f"{RECIPE}.toml", child


def build(recipe: Path, cache: Path, session: Path) -> float:
    out = Path(tempfile.mkdtemp(prefix="out-", dir=session))
    argv = [sys.executable, "-m", "tmplbuild", "build", str(recipe), "--out", str(out), "--cache-dir", str(cache)]
    start = time.monotonic()
    proc = subprocess.run(argv, cwd=PROJECT, capture_output=True, text=True)
    secs = time.monotonic() - start
    if proc.returncode != 0:
        log(proc.stderr[-3000:])
        sys.exit(1)
    shutil.rmtree(out)
    return secs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--cache-dir", type=Path, help="package cache (default: a fresh one, filled by a first build)")
    args = ap.parse_args()
    session = Path(tempfile.mkdtemp(prefix="tmplbuild-bench-oci-", dir="/var/tmp"))
    try:
        with_oci, without = recipes(session)
        cache = args.cache_dir or session / "cache"
        log("warming the package cache (untimed)")
        build(with_oci, cache, session)
        times: dict[str, list[float]] = {"with oci": [], "without oci": []}
        for i in range(args.repeat):
            for label, recipe in (("without oci", without), ("with oci", with_oci)):
                secs = build(recipe, cache, session)
                times[label].append(secs)
                log(f"round {i + 1}: {label} {secs:.1f} s")
        a, b = statistics.median(times["with oci"]), statistics.median(times["without oci"])
        print(f"| warm build of {RECIPE} | seconds (median of {args.repeat}) | ratio |")
        print("|---|---|---|")
        print(f"| formats tar.zst, tar.xz | {b:.1f} | 1.00x |")
        print(f"| formats tar.zst, tar.xz, oci (shipped) | {a:.1f} | {a / b:.2f}x "
              f"(goal <= {GOAL}x: {'PASS' if a / b <= GOAL else 'MISS'}) |")
    finally:
        shutil.rmtree(session, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
