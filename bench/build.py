#!/usr/bin/env python3
"""Benchmark tmplbuild against plain debootstrap and mmdebstrap, what tar.xz costs a build, and zstd against xz.

Run as root from anywhere: python3 bench/build.py [--repeat N] [--json FILE]. See bench/README.md."""
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
from collections.abc import Callable
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))  # the package is run from its checkout, not installed

import zstandard  # noqa: E402

from tmplbuild.builder.lxcmeta import FORMAT as LXC_META  # noqa: E402
from tmplbuild.builder.mirror import resolve_mirror  # noqa: E402
from tmplbuild.builder.pack import XZ_LEVEL, ZSTD_LEVEL, ZSTD_WINDOW_LOG  # noqa: E402
from tmplbuild.errors import UsageError  # noqa: E402
from tmplbuild.recipe.load import load_recipe  # noqa: E402

RECIPE = "debian-12-minimal"
RECIPES = PROJECT / "recipes"
ZST_ONLY = f"{RECIPE}-zst-only"  # a temporary child recipe: the shipped one with formats = ["tar.zst"]
# Max ratio to debootstrap; checked against plain minbase and against debootstrap installing the recipe's packages.
GOALS = {"tmplbuild cold": 0.8, "tmplbuild warm": 0.6}
REFS = ("debootstrap", "debootstrap, recipe's packages")
# Like with like: a tmplbuild build against debootstrap installing the same packages from a package cache in the
# same state (cold: empty; warm: filled by the run before, debootstrap's own --cache-dir), with its goal.
SAME_COLD, SAME_WARM = "debootstrap, recipe's packages", "debootstrap, recipe's packages, warm cache"
LIKE = {"tmplbuild cold": (SAME_COLD, 0.8), "tmplbuild warm": (SAME_WARM, 0.5),
        "tmplbuild warm, tar.zst only": (SAME_WARM, None), "tmplbuild warm on disk": (SAME_WARM, None)}
XZ_LEVELS = (XZ_LEVEL, 1, 6)  # warm builds with tar.xz at these levels; the default's is the "tmplbuild warm" row
PACK_RE = re.compile(rb"^\s*pack \+ compress: ([0-9.]+)s$", re.M)  # the builder's step line
SIZE_GOAL, TIME_GOAL = 1.10, 1 / 3  # zstd: within 10% of xz's size in at most 1/3 of its time
XZ_REF = "xz -6 -T0"
CHUNK = 1 << 20


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)  # progress on stderr so stdout holds only the tables


def run_timed(argv: list[str], work: Path) -> float:
    """Seconds argv took (the whole process); its output is in work/log.txt. On failure print the tail of that
    log and exit 1 (the caller's finally cleans up)."""
    logfile = work / "log.txt"
    with open(logfile, "wb") as out:
        start = time.monotonic()
        rc = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, cwd=PROJECT).returncode
        secs = time.monotonic() - start
    if rc != 0:
        tail = logfile.read_text(errors="replace").splitlines()[-30:]
        log(f"FAILED ({rc}): {argv[0]} {argv[1]}\n" + "\n".join(tail))
        sys.exit(1)
    log(f"    {secs:.1f} s")
    return secs


def fresh_dir(session: Path, name: str) -> Path:
    # A fresh disk directory per step, so no step reuses another's files or page-cache-warm tree by accident.
    return Path(tempfile.mkdtemp(prefix=f"{name}-", dir=session))


def zst_only_recipe(session: Path) -> Path:
    """A recipe dir holding a copy of the shipped recipe, a copy of recipes/files (a recipe reads only inside its
    own directory: a link out is refused) and a child that only narrows formats to tar.zst. Returns the child's
    path."""
    d = session / "recipes"
    d.mkdir()
    shutil.copy(RECIPES / f"{RECIPE}.toml", d / f"{RECIPE}.toml")
    shutil.copytree(RECIPES / "files", d / "files")
    child = d / f"{ZST_ONLY}.toml"
    child.write_text(f'extends = "{RECIPE}"\n\n[template]\nname = "{ZST_ONLY}"\nformats = ["tar.zst"]\n')
    return child


def tmplbuild_builds(zst_only: Path) -> list[tuple[str, str, list[str]]]:
    """(row, recipe, extra arguments), in the order run: cold first, then warm from the same cache."""
    builds = [("tmplbuild cold", RECIPE, []),
              ("tmplbuild warm", RECIPE, []),  # as shipped: tar.zst and tar.xz at the default xz level
              ("tmplbuild warm, tar.zst only", str(zst_only), [])]
    builds += [(f"tmplbuild warm, xz -{n}", RECIPE, ["--xz-level", str(n)]) for n in XZ_LEVELS if n != XZ_LEVEL]
    # Informational: the warm build on disk (--no-tmpfs), like for like with the references, to show how much of
    # the gain is the tmpfs and how much the skipped resolution and download.
    builds.append(("tmplbuild warm on disk", RECIPE, ["--no-tmpfs"]))
    return builds


def one_round(session: Path, mirror: str, suite: str, keep: Path | None, include: tuple[str, ...],
              exclude: tuple[str, ...], zst_only: Path) -> tuple[dict[str, float], dict[str, float], dict[str, int]]:
    """Run every row once; if keep is given, move the warm build's .tar.zst there. Returns (whole-process seconds
    per row, pack + compress seconds per tmplbuild row, .tar.xz bytes per tmplbuild row that wrote one)."""
    times: dict[str, float] = {}
    pack: dict[str, float] = {}
    xz_bytes: dict[str, int] = {}
    work = fresh_dir(session, "debootstrap")
    log("  debootstrap ...")
    times["debootstrap"] = run_timed(
        ["debootstrap", "--variant=minbase", suite, str(work / "root"), mirror], work)
    shutil.rmtree(work)

    # The same package set as the recipe (what tmplbuild actually installs), like for like: first with an empty
    # package cache of its own (cold, as tmplbuild's cold build), then again with that cache filled (warm, as
    # tmplbuild's warm builds).
    opts = [f"--include={','.join(include)}"] + ([f"--exclude={','.join(exclude)}"] if exclude else [])
    debs = fresh_dir(session, "debootstrap-cache")
    for label in (SAME_COLD, SAME_WARM):
        work = fresh_dir(session, re.sub(r"[^a-z0-9]+", "-", label))
        log(f"  {label} ...")
        times[label] = run_timed(["debootstrap", "--variant=minbase", f"--cache-dir={debs}", *opts, suite,
                                  str(work / "root"), mirror], work)
        shutil.rmtree(work)
    shutil.rmtree(debs)

    work = fresh_dir(session, "mmdebstrap")
    log("  mmdebstrap ...")
    times["mmdebstrap"] = run_timed(
        ["mmdebstrap", "--variant=minbase", suite, str(work / "out.tar"), mirror], work)
    shutil.rmtree(work)

    cache = fresh_dir(session, "cache")  # brand-new and empty for the cold build, then reused warm
    for label, recipe, extra in tmplbuild_builds(zst_only):
        work = fresh_dir(session, re.sub(r"[^a-z0-9]+", "-", label))
        log(f"  {label} ...")
        # --mirror so tmplbuild fetches from the same mirror as the references.
        times[label] = run_timed(
            [sys.executable, "-m", "tmplbuild", "build", recipe, "--out", str(work / "out"),
             "--cache-dir", str(cache), "--mirror", mirror, "--force", *extra], work)
        found = PACK_RE.findall((work / "log.txt").read_bytes())
        if len(found) != 1:
            log(f"FAILED: {label}: expected one 'pack + compress: N.Ns' line in its output, found {len(found)}")
            sys.exit(1)
        pack[label] = float(found[0])
        for xz in (work / "out").glob("*.tar.xz"):
            if not xz.name.endswith(f".{LXC_META}"):  # the rootfs, not the small LXC meta tarball
                xz_bytes[label] = xz.stat().st_size
        if label == "tmplbuild warm" and keep is not None:
            built = sorted((work / "out").glob("*.tar.zst"))
            if not built:
                log("FAILED: the warm build wrote no .tar.zst")
                sys.exit(1)
            shutil.move(built[0], keep)
        shutil.rmtree(work)
    shutil.rmtree(cache)
    return times, pack, xz_bytes


def zstd_compress(params: zstandard.ZstdCompressionParameters) -> Callable[[Path, Path], None]:
    def go(src: Path, dest: Path) -> None:
        cctx = zstandard.ZstdCompressor(compression_params=params)
        with open(src, "rb") as i, open(dest, "wb") as o:
            cctx.copy_stream(i, o, read_size=CHUNK, write_size=CHUNK)
    return go


def xz_compress(level: int, threads: int) -> Callable[[Path, Path], None]:
    def go(src: Path, dest: Path) -> None:
        with open(src, "rb") as i, open(dest, "wb") as o:
            subprocess.run(["xz", f"-{level}", f"-T{threads}", "-c"], stdin=i, stdout=o, check=True)
    return go


def compression_rows(tarball: Path, session: Path) -> list[dict]:
    work = fresh_dir(session, "compression")
    tar = work / "template.tar"
    with open(tarball, "rb") as i, open(tar, "wb") as o:
        # max_window_size: accept frames with any window tmplbuild might have written.
        zstandard.ZstdDecompressor(max_window_size=1 << 31).copy_stream(i, o, read_size=CHUNK, write_size=CHUNK)
    log(f"  uncompressed tar: {tar.stat().st_size / 1e6:.1f} MB")

    # write_checksum as tmplbuild does (xz writes a check too); threads=-1 everywhere, like xz -T0.
    candidates: list[tuple[str, bool, Callable[[Path, Path], None]]] = []
    for level in (3, 9, 19):
        p = zstandard.ZstdCompressionParameters(compression_level=level, threads=-1, write_checksum=True)
        candidates.append((f"zstd -{level}", False, zstd_compress(p)))
    ldm_levels = sorted({9, 11, 14, 15, 19, ZSTD_LEVEL})  # always include the default row
    for level in ldm_levels:
        p = zstandard.ZstdCompressionParameters(compression_level=level, enable_ldm=True, window_log=27,
                                                threads=-1, write_checksum=True)
        default = level == ZSTD_LEVEL and ZSTD_WINDOW_LOG == 27
        candidates.append((f"zstd -{level} --long=27", default, zstd_compress(p)))
    # -0 and -1 with two threads, as tmplbuild writes tar.xz (multi-threaded, at least -T2); -6 -T0 is the
    # reference every row is compared with.
    for level in (0, 1):
        candidates.append((f"xz -{level} -T2", level == XZ_LEVEL, xz_compress(level, 2)))
    candidates.append((XZ_REF, False, xz_compress(6, 0)))

    rows = []
    for name, default, fn in candidates:
        dest = work / "out.bin"
        log(f"  {name} ...")
        start = time.monotonic()
        fn(tar, dest)
        secs = time.monotonic() - start
        rows.append({"name": name, "default": default, "bytes": dest.stat().st_size, "seconds": secs})
        dest.unlink()
    shutil.rmtree(work)

    xz = next(r for r in rows if r["name"] == XZ_REF)
    for r in rows:
        r["size_vs_xz"] = r["bytes"] / xz["bytes"]
        r["time_vs_xz"] = r["seconds"] / xz["seconds"]
        r["meets_goal"] = r["size_vs_xz"] <= SIZE_GOAL and r["time_vs_xz"] <= TIME_GOAL
    return rows


def build_table(medians: dict[str, float], pack: dict[str, float]) -> tuple[list[str], list[list[str]]]:
    """Whole-process seconds, the builder's pack + compress step, and the ratio to both debootstrap rows."""
    rows = []
    for tool, secs in medians.items():
        goal = GOALS.get(tool)
        verdict = "" if goal is None else " / ".join(
            "PASS" if secs / medians[ref] <= goal else "MISS" for ref in REFS)
        rows.append([tool, f"{secs:.1f}", f"{pack[tool]:.1f}" if tool in pack else "",
                     *(f"{secs / medians[ref]:.2f}x" for ref in REFS),
                     "" if goal is None else f"<= {goal:.1f}x", verdict])
    return ["tool", "seconds", "pack + compress", "vs debootstrap minbase", "vs debootstrap same packages",
            "goal", "result (minbase / same packages)"], rows


def like_table(medians: dict[str, float]) -> tuple[list[str], list[list[str]]]:
    """Each tmplbuild build against debootstrap with the same packages and a package cache in the same state."""
    rows = []
    for tool, (ref, goal) in LIKE.items():
        if tool in medians and ref in medians:
            ratio = medians[tool] / medians[ref]
            rows.append([tool, f"{medians[tool]:.1f}", ref, f"{medians[ref]:.1f}", f"{ratio:.2f}x",
                         "" if goal is None else f"<= {goal:.1f}x",
                         "" if goal is None else ("PASS" if ratio <= goal else "MISS")])
    return ["tmplbuild", "seconds", "against", "seconds", "ratio", "goal", "result"], rows


def xz_cost_table(medians: dict[str, float], pack: dict[str, float],
                  xz_mb: dict[str, float]) -> tuple[list[str], list[list[str]]]:
    """What tar.xz adds to a warm build, per level: against the same build writing tar.zst only."""
    base = "tmplbuild warm, tar.zst only"
    rows = [["tar.zst only", "", f"{medians[base]:.1f}", f"{pack[base]:.1f}", "", "",
             f"{medians[base] / medians['debootstrap']:.2f}x",
             f"{medians[base] / medians[REFS[1]]:.2f}x"]]
    for level in sorted(XZ_LEVELS):
        row = "tmplbuild warm" if level == XZ_LEVEL else f"tmplbuild warm, xz -{level}"
        name = f"+ tar.xz -{level}" + (" (default)" if level == XZ_LEVEL else "")
        rows.append([name, f"{xz_mb[row]:.1f}" if row in xz_mb else "", f"{medians[row]:.1f}", f"{pack[row]:.1f}",
                     f"{medians[row] - medians[base]:+.1f}", f"{pack[row] - pack[base]:+.1f}",
                     f"{medians[row] / medians['debootstrap']:.2f}x", f"{medians[row] / medians[REFS[1]]:.2f}x"])
    return ["warm build writes", "tar.xz MB", "seconds", "pack + compress", "added to the build",
            "added to pack + compress", "vs debootstrap minbase", "vs debootstrap same packages"], rows


def compression_table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    out = []
    for r in rows:
        default = " (tmplbuild's tar.xz)" if r["name"].startswith("xz") else " (tmplbuild default)"
        name = r["name"] + (default if r["default"] else "")
        goal = "" if r["name"].startswith("xz") else ("yes" if r["meets_goal"] else "no")
        out.append([name, f"{r['bytes'] / 1e6:.1f}", f"{r['seconds']:.1f}",
                    # Three decimals on size: 1.103 would print as a passing-looking 1.10.
                    f"{r['size_vs_xz']:.3f}x", f"{r['time_vs_xz']:.2f}x", goal])
    return ["compressor", "MB", "seconds", "size vs xz", "time vs xz", "meets goal"], out


def plain(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(c) for c in col) for col in zip(header, *rows)]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows])


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mirror", help="Debian mirror URL (default: $TMPLBUILD_MIRROR, else the host's apt sources)")
    ap.add_argument("--repeat", type=int, default=1, help="run the build sequence N times, report medians")
    ap.add_argument("--json", type=Path, help="write raw results here")
    ap.add_argument("--skip-compression", action="store_true")
    ap.add_argument("--only-compression", type=Path, metavar="TARBALL", help="compare compressors on this .tar.zst")
    ap.add_argument("--suite", default="bookworm", help="suite for debootstrap/mmdebstrap (default: bookworm)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench/build.py must run as root (debootstrap, mmdebstrap and tmplbuild build need it)", file=sys.stderr)
        return 2
    if args.repeat < 1:
        ap.error("--repeat must be at least 1")
    if args.only_compression and not args.only_compression.is_file():
        ap.error(f"{args.only_compression}: no such file")

    results: dict = {"suite": args.suite, "repeat": args.repeat, "recipe": RECIPE}
    tables: list[tuple[str, list[str], list[list[str]]]] = []
    # /var/tmp is on disk; /tmp may be a tmpfs, which would flatter the references.
    session = Path(tempfile.mkdtemp(prefix="tmplbuild-bench-", dir="/var/tmp"))
    try:
        tarball = args.only_compression
        if tarball is None:
            try:
                mirror = resolve_mirror(args.mirror, None)  # never printed: mirror hosts stay out of logs
            except UsageError as exc:
                log(f"bench/build.py: {exc}")
                return 2
            recipe = load_recipe(RECIPES / f"{RECIPE}.toml")  # debootstrap's like-for-like row uses its packages
            zst_only = zst_only_recipe(session)
            runs: dict[str, list[float]] = {}
            pack_runs: dict[str, list[float]] = {}
            xz_runs: dict[str, list[int]] = {}
            for n in range(args.repeat):
                log(f"round {n + 1}/{args.repeat}")
                keep = None if args.skip_compression else session / "template.tar.zst"
                times, pack, xz_bytes = one_round(session, mirror, args.suite, keep, recipe.include,
                                                  recipe.exclude, zst_only)
                for tool, secs in times.items():
                    runs.setdefault(tool, []).append(secs)
                for tool, secs in pack.items():
                    pack_runs.setdefault(tool, []).append(secs)
                for tool, size in xz_bytes.items():
                    xz_runs.setdefault(tool, []).append(size)
            medians = {tool: statistics.median(v) for tool, v in runs.items()}
            pack_medians = {tool: statistics.median(v) for tool, v in pack_runs.items()}
            xz_mb = {tool: statistics.median(v) / 1e6 for tool, v in xz_runs.items()}
            results["builds"] = {"runs": runs, "median": medians, "pack_compress_runs": pack_runs,
                                 "pack_compress_median": pack_medians, "tar_xz_bytes": xz_runs,
                                 "recipe_packages": {"include": list(recipe.include), "exclude": list(recipe.exclude)},
                                 "ratio": {ref: {t: s / medians[ref] for t, s in medians.items()} for ref in REFS},
                                 "goals": GOALS, "default_xz_level": XZ_LEVEL}
            tables.append((f"Build time (median of {args.repeat}, suite {args.suite}; seconds are the whole process)",
                           *build_table(medians, pack_medians)))
            tables.append((f"Like with like: cold with cold, warm with warm (median of {args.repeat})",
                           *like_table(medians)))
            results["builds"]["like_with_like"] = {t: {"against": r, "goal": g} for t, (r, g) in LIKE.items()}
            tables.append((f"What tar.xz costs a warm build (median of {args.repeat})",
                           *xz_cost_table(medians, pack_medians, xz_mb)))
            tarball = keep
        if tarball is not None:
            log("compression")
            rows = compression_rows(tarball, session)
            results["compression"] = {"rows": rows, "goal": {"size_vs_xz_max": SIZE_GOAL, "time_vs_xz_max": TIME_GOAL},
                                      "default": {"level": ZSTD_LEVEL, "window_log": ZSTD_WINDOW_LOG}}
            tables.append((f"Compression (goal: within 10% of {XZ_REF}'s size in at most 1/3 of its time)",
                           *compression_table(rows)))
    finally:
        shutil.rmtree(session, ignore_errors=True)

    for title, header, rows in tables:
        print(f"\n{title}\n{plain(header, rows)}")
    print("\nMarkdown:")
    for title, header, rows in tables:
        print(f"\n{title}:\n\n{markdown(header, rows)}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
