#!/usr/bin/env python3
"""A foreign-architecture build and boot on this amd64 host, through qemu-user-static (binfmt_misc).

In one run, like with like (the same architecture, the same package set: minbase plus the recipe's
`packages.include`, each tool's own package cache):
  debootstrap --arch=ARCH --variant=minbase --include=... --cache-dir=D   cold (empty D), then warm (D filled)
  tmplbuild build debian-12-minimal --arch ARCH --cache-dir C             cold (empty C), then warm (C filled)
warm rows repeated --repeat times (median). Every row is the whole process. tmplbuild's build writes everything the
shipped recipe ships (tar.zst, tar.xz, the OCI image, SBOMs); debootstrap writes a tree on disk. Goal: tmplbuild
warm at most 0.7x of debootstrap warm. Then the boot test of the built template under emulation, the whole
`tmplbuild test TEMPLATE --manager M --apt-mirror named` process for nspawn,lxc (what `make test` runs) and for
every manager (what the publish gate runs). Root; about 15 minutes for arm64."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))

from tmplbuild import foreign  # noqa: E402
from tmplbuild.builder.mirror import resolve_mirror  # noqa: E402
from tmplbuild.recipe.load import load_recipe  # noqa: E402

RECIPE = "debian-12-minimal"
GOAL = 0.7


def timed(argv: list[str], env: dict[str, str], log: Path) -> float:
    with open(log, "wb") as out:
        start = time.monotonic()
        rc = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, cwd=PROJECT, env=env).returncode
        secs = time.monotonic() - start
    if rc != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
        raise SystemExit(f"{' '.join(argv[:4])} … exited {rc}:\n{tail}")
    print(f"    {secs:.1f} s", file=sys.stderr, flush=True)
    return secs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="arm64")
    ap.add_argument("--repeat", type=int, default=1, help="warm rows: median of N (default 1)")
    ap.add_argument("--mirror", help="Debian mirror (default: $TMPLBUILD_MIRROR, else the host's apt sources)")
    ap.add_argument("--skip-boot", action="store_true")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench/foreign.py runs debootstrap and boots containers: run it as root")
    emu = foreign.emulator(args.arch)  # exits 2 with what is missing
    recipe = load_recipe(PROJECT / "recipes" / f"{RECIPE}.toml")
    mirror = resolve_mirror(args.mirror, recipe.bootstrap.mirror)
    session = Path(tempfile.mkdtemp(prefix="tmplbuild-bench-foreign-", dir="/var/tmp"))
    env = {**os.environ, "TMPLBUILD_STATE_DIR": str(session / "state"),
           "TMPLBUILD_SYSTEM_CONFIG_DIR": str(session / "etc")}
    rows: dict[str, list[float]] = {}
    try:
        debs = session / "debootstrap-cache"
        debs.mkdir()
        opts = [f"--arch={args.arch}", "--variant=minbase", f"--include={','.join(recipe.include)}",
                f"--cache-dir={debs}"]
        for label, n in (("debootstrap, cold", 1), ("debootstrap, warm", args.repeat)):
            for _ in range(n):
                target = Path(tempfile.mkdtemp(dir=session))
                print(f"  {label} ...", file=sys.stderr, flush=True)
                rows.setdefault(label, []).append(timed(["debootstrap", *opts, recipe.suite, str(target / "root"),
                                                         mirror], env, session / "log.txt"))
                shutil.rmtree(target)
        cache = session / "cache"
        out = session / "out"
        for label, n in (("tmplbuild, cold", 1), ("tmplbuild, warm", args.repeat)):
            for _ in range(n):
                print(f"  {label} ...", file=sys.stderr, flush=True)
                rows.setdefault(label, []).append(timed(
                    [sys.executable, "-m", "tmplbuild", "build", RECIPE, "--arch", args.arch, "--out", str(out),
                     "--cache-dir", str(cache), "--mirror", mirror, "--force"], env, session / "log.txt"))
        med = {k: statistics.median(v) for k, v in rows.items()}
        ratio = med["tmplbuild, warm"] / med["debootstrap, warm"]
        print(f"{args.arch} on {foreign.host_arch()} through {emu.interpreter} (qemu "
              f"{'.'.join(map(str, emu.version() or ())) or '?'}), {os.cpu_count()} cores, median of {args.repeat}\n")
        print("| tool | seconds | vs debootstrap warm |\n|---|---|---|")
        for label in ("debootstrap, cold", "debootstrap, warm", "tmplbuild, cold", "tmplbuild, warm"):
            print(f"| {label} | {med[label]:.1f} | {med[label] / med['debootstrap, warm']:.2f}x |")
        print(f"\ngoal: tmplbuild warm <= {GOAL}x of debootstrap warm: {ratio:.2f}x "
              f"{'PASS' if ratio <= GOAL else 'MISS'}")
        if not args.skip_boot:
            tar = next(out.glob(f"{RECIPE}_*_{args.arch}.tar.zst"))
            print("\n| boot test under emulation | seconds | result |\n|---|---|---|")
            for managers in ("nspawn,lxc", "all"):
                start = time.monotonic()
                res = subprocess.run([sys.executable, "-m", "tmplbuild", "test", str(tar), "--manager", managers,
                                      "--apt-mirror", "named", "--json"], cwd=PROJECT, env=env,
                                     capture_output=True, text=True)
                secs = time.monotonic() - start
                status = json.loads(res.stdout)["status"] if res.stdout.strip().startswith("{") else f"exit {res.returncode}"
                print(f"| `tmplbuild test --manager {managers}` | {secs:.1f} | {status} |")
    finally:
        shutil.rmtree(session, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
