#!/usr/bin/env python3
"""What the publish gate costs: `tmplbuild publish` boots the template under every container manager here
before the index names it. This measures that gate for one template, the shipped debian-12-minimal.

In one run, the median of --repeat rounds, each a whole process (Python start-up included):
  gate:      tmplbuild publish MANIFEST --repo R --key K               (boot test + publish)
  no gate:   tmplbuild publish MANIFEST --repo R --key K --skip-test   (publish only)
The gate's cost is the difference. Each round publishes a fresh copy of the manifest (the files hard-linked, so
nothing is recorded as tested yet) into a fresh repository, so every round boots. Beside it, the whole
`tmplbuild test TEMPLATE --apt-mirror named --jobs J` process (what the gate runs) for several J, with the
per-manager phases of one run, to show where the time goes. Goal: the gate at most 15 s on this 2-core machine.
Run as root: it builds the template first unless given --manifest (~4 min with a warm package cache)."""
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tmplbuild.boot.runner import ALL, default_jobs  # noqa: E402
from tmplbuild.sign import generate_key  # noqa: E402
from tmplbuild.sign.keys import kill_agents  # noqa: E402

PY = sys.executable
GOAL = 15.0


def timed(argv: list[str], env: dict[str, str]) -> tuple[float, subprocess.CompletedProcess[str]]:
    start = time.monotonic()
    res = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True)
    elapsed = time.monotonic() - start
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:4])} … exited {res.returncode}: {res.stderr.strip()[-800:]}")
    return elapsed, res


def staged_copy(manifest: Path, dest: Path) -> Path:
    """The manifest (a new file: the gate writes its test record into it) and its files (hard links) in dest."""
    dest.mkdir()
    doc = json.loads(manifest.read_text())
    doc.pop("test", None)
    for a in doc["artifacts"]:
        os.link(manifest.with_name(a["file"]), dest / a["file"])
    out = dest / manifest.name
    out.write_text(json.dumps(doc))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--manifest", help="a built template's manifest (default: build debian-12-minimal here)")
    ap.add_argument("--cache-dir", help="package cache for that build (default: tmplbuild's)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--jobs", default="1,2,3,5", help="--jobs values to time `tmplbuild test` with (default 1,2,3,5)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench/gate.py boots containers: run it as root")
    work = Path(tempfile.mkdtemp(prefix="tmplbuild-bench-gate-", dir="/var/tmp"))
    home = work / "gnupg"
    env = {**os.environ, "TMPLBUILD_STATE_DIR": str(work / "state"),
           "TMPLBUILD_SYSTEM_CONFIG_DIR": str(work / "etc")}
    try:
        if args.manifest:
            manifest = Path(args.manifest).resolve()
        else:
            argv = [PY, "-m", "tmplbuild", "build", "debian-12-minimal", "--out", str(work / "out")]
            timed(argv + (["--cache-dir", args.cache_dir] if args.cache_dir else []), env)
            manifest = next((work / "out").glob("debian-12-minimal_*_amd64.manifest.json"))
        primary = manifest.with_name(json.loads(manifest.read_text())["artifacts"][0]["file"])
        fpr = generate_key("Bench <bench@example.invalid>", home, expire="1d")
        gated, plain = [], []
        for i in range(args.repeat):
            for skip in ((False, True) if i % 2 == 0 else (True, False)):
                tag = f"{i}-{'skip' if skip else 'gate'}"
                repo = work / f"repo-{tag}"
                timed([PY, "-m", "tmplbuild", "repo", "init", str(repo), "--key", fpr, "--gnupghome", str(home)], env)
                staged = staged_copy(manifest, work / f"stage-{tag}")
                seconds, _ = timed([PY, "-m", "tmplbuild", "publish", str(staged), "--repo", str(repo), "--key", fpr,
                                    "--gnupghome", str(home), *(["--skip-test"] if skip else [])], env)
                (plain if skip else gated).append(seconds)
                shutil.rmtree(repo)
                shutil.rmtree(staged.parent)
        tests: dict[int, list[float]] = {}
        phases: dict[int, list[dict]] = {}
        for i in range(args.repeat):
            for jobs in [int(j) for j in args.jobs.split(",")]:
                seconds, res = timed([PY, "-m", "tmplbuild", "test", str(primary), "--apt-mirror", "named",
                                      "--jobs", str(jobs), "--json"], env)
                tests.setdefault(jobs, []).append(seconds)
                report = json.loads(res.stdout)
                if report["status"] != "pass":
                    raise SystemExit(f"tmplbuild test --jobs {jobs}: {report['status']}")
                phases[jobs] = report["managers"]
        g, p = statistics.median(gated), statistics.median(plain)
        lines = [f"template: {primary.name} ({primary.stat().st_size / 1e6:.1f} MB), median of {args.repeat}, "
                 f"{os.cpu_count()} cores", "",
                 "| command | seconds |", "|---|---|",
                 f"| tmplbuild publish (with the gate) | {g:.1f} |",
                 f"| tmplbuild publish --skip-test | {p:.1f} |",
                 f"| **the gate** (difference) | **{g - p:.1f}** |"]
        lines += [f"| tmplbuild test --apt-mirror named --jobs {j} | {statistics.median(v):.1f} |" for j, v in tests.items()]
        lines += ["", f"goal: the gate <= {GOAL:.0f} s: {'PASS' if g - p <= GOAL else 'MISS'}", ""]
        jobs = default_jobs(len(ALL)) if default_jobs(len(ALL)) in phases else max(phases)
        lines += [f"phases of one `tmplbuild test --jobs {jobs}` run (seconds, side by side):", "",
                  "| manager | unpack | boot | checks | shutdown | total |", "|---|---|---|---|---|---|"]
        for m in phases[jobs]:
            ph = m.get("phases", {})
            lines.append(f"| {m['manager']} | " + " | ".join(f"{ph.get(k, 0):.1f}" for k in
                                                             ("unpack", "boot", "checks", "shutdown"))
                         + f" | {m['seconds']:.1f} |")
        print("\n".join(lines))
    finally:
        kill_agents(home)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
