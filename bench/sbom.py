#!/usr/bin/env python3
"""What the SBOMs and the provenance add to a warm build of the shipped debian-12-minimal. Goal: at most 0.5 s.

In one run: warm `tmplbuild build debian-12-minimal` (the whole process, the package cache filled by a first,
untimed build), and on the very tree that build shipped (unpacked from its tar.zst) the work the documents added,
each timed over several rounds in-process: the inventory step (dpkg-query plus source, maintainer, each .deb's
signed sha256 and the licence from debian/copyright) against what the manifest step did before (dpkg-query alone),
and writing the SPDX, CycloneDX and provenance documents with their hashes. Added = (inventory - dpkg-query alone)
+ documents. The build's own step lines ("inventory", "sbom + provenance", 0.1 s resolution) are reported too.

Run as root: python3 bench/sbom.py [--repeat N] [--cache-dir DIR]. See bench/README.md."""
from __future__ import annotations

import argparse
import hashlib
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))
RECIPE = "debian-12-minimal"
GOAL = 0.5


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def build(cache: Path, out: Path) -> tuple[float, dict[str, float]]:
    argv = [sys.executable, "-m", "tmplbuild", "build", RECIPE, "--out", str(out), "--cache-dir", str(cache), "--force"]
    start = time.monotonic()
    proc = subprocess.run(argv, cwd=PROJECT, capture_output=True, text=True)
    secs = time.monotonic() - start
    if proc.returncode != 0:
        log(proc.stderr[-3000:])
        sys.exit(1)
    steps = {m.group(1): float(m.group(2)) for m in re.finditer(r"^    ([a-z +-]+): ([\d.]+)s$", proc.stderr, re.M)}
    return secs, steps


def best(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3, help="warm builds (default 3)")
    ap.add_argument("--rounds", type=int, default=7, help="in-process rounds of each measured step (default 7)")
    ap.add_argument("--cache-dir", type=Path, help="package cache (default: a fresh one, filled by a first build)")
    args = ap.parse_args()
    from tmplbuild.builder.manifest import installed_packages, inventory
    from tmplbuild.manifest import parse as parse_manifest
    from tmplbuild.sbom import documents

    session = Path(tempfile.mkdtemp(prefix="tmplbuild-bench-sbom-", dir="/var/tmp"))
    try:
        cache = args.cache_dir or session / "cache"
        out = session / "out"
        log("first build (fills the package cache, not timed)")
        build(cache, out)
        builds = []
        for i in range(args.repeat):
            secs, steps = build(cache, out)
            builds.append((secs, steps))
            log(f"warm build {i + 1}: {secs:.1f} s (inventory {steps.get('inventory')} s, sbom + provenance "
                f"{steps.get('sbom + provenance')} s)")
        manifest_path = next(out.glob("*.manifest.json"))
        m = parse_manifest(manifest_path.read_bytes())
        tree = session / "tree"
        tree.mkdir()
        subprocess.run(["tar", "--zstd", "--numeric-owner", "-xpf", str(next(out.glob("*.tar.zst"))), "-C", str(tree)],
                       check=True)
        known = {(p.name, p.version, p.arch): (p.sha256, p.uri) for p in m.packages}
        plain = best(lambda: installed_packages(tree), args.rounds)
        full = best(lambda: inventory(tree, known, []), args.rounds)
        assert len(inventory(tree, known, [])) == len(m.packages)

        def write_documents() -> None:
            made = [documents.spdx(m), documents.cyclonedx(m)]
            subjects = [(a.file, a.sha256) for a in m.artifacts] + [(f"x{i}", hashlib.sha256(d).hexdigest())
                                                                  for i, d in enumerate(made)]
            made.append(documents.provenance(m, subjects, [], ["tar.zst"]))
            for i, data in enumerate(made):
                (session / f"doc{i}").write_bytes(data)
                hashlib.sha512(data).hexdigest()

        docs = best(write_documents, args.rounds)
        added = max(full - plain, 0.0) + docs
        warm = statistics.median(s for s, _ in builds)
        verdict = "PASS" if added <= GOAL else "MISS"
        print(f"debian-12-minimal, {len(m.packages)} packages, "
              f"{sum(1 for p in m.packages if p.license != 'NOASSERTION')} with a declared licence")
        print("| measure | seconds |")
        print("|---|---|")
        print(f"| warm build, whole process (median of {args.repeat}) | {warm:.2f} |")
        print(f"| dpkg-query alone (the manifest step before SBOMs) | {plain:.3f} |")
        print(f"| inventory (dpkg-query + sources, hashes, licences) | {full:.3f} |")
        print(f"| SPDX + CycloneDX + provenance, written and hashed | {docs:.3f} |")
        print(f"| **added by SBOMs and provenance** | **{added:.3f}** ({added / warm * 100:.1f}% of the warm build; "
              f"goal ≤ {GOAL} s: {verdict}) |")
        return 0 if added <= GOAL else 1
    finally:
        shutil.rmtree(session, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
