#!/usr/bin/env python3
"""What a weekly update costs a node with signed deltas (issue 24), for the shipped recipes, in one run.

For each recipe, two real builds that differ by updated packages: the shipped recipe, and the same recipe
without its -updates and -security suites merged in (the point release as it was: an older template whose
packages the updates replaced). Both are published, in that order, into one signed repository (so the newer
version lists a delta from the older), served by `tmplbuild serve` (gunicorn, the real server) on 127.0.0.1.

A node holds the older tar.zst in its template cache. Each row is a whole `tmplbuild fetch` process (start-up,
index and signature verification, every check, state update), the newer file removed before every run, the
median of --repeat runs:
  full:  tmplbuild fetch NAME --no-delta   (the whole tar.zst downloaded)
  delta: tmplbuild fetch NAME              (the delta downloaded, the tar rebuilt from the older file and
                                            recompressed as the builder did, checked against the signed hashes)
  curl + sha256sum of the full file, for scale.
Twice: on 127.0.0.1 as it is, and with the loopback link throttled to 100 Mbit/s (tc tbf, in a network
namespace of its own: the machine's own loopback is never touched). CPU is user + system time of the fetch
process and its children (gpg), from the kernel's accounting.

Goals: the delta at most 10% of the full file; the delta update faster than the full fetch on the throttled
link; at most 3 s of CPU for a fetch with a delta.

The two builds are months of updates apart (the bookworm point release against today's updates), so the deltas
measured here are larger than between two weekly builds: an upper bound."""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SHIPPED = ("debian-12-minimal", "debian-12-ssh", "debian-12-standard", "debian-13-minimal")
THROTTLE = "100mbit"


def tmplbuild() -> list[str]:
    script = Path(sys.executable).parent / "tmplbuild"
    return [str(script)] if script.exists() else [sys.executable, "-m", "tmplbuild"]


def run(argv: list[str], env: dict[str, str] | None = None, **kw) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, env={**os.environ, **(env or {})}, **kw)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:4])}…: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    return proc


def timed(argv: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    """(wall seconds, CPU seconds of the process and its children, stdout) of one whole process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.monotonic()
    proc = run(argv, env)
    wall = time.monotonic() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, proc.stdout


# -- phase 1: builds and the repository (network to the mirror) ---------------------------------------------------

def older_recipes(work: Path) -> Path:
    """The shipped recipes, each without its -updates and -security suites."""
    dest = work / "older-recipes"
    shutil.copytree(ROOT / "recipes", dest, symlinks=True)
    for recipe in dest.glob("*.toml"):
        recipe.write_text(re.sub(r"(?m)^extra_suites = .*$", "extra_suites = []", recipe.read_text()))
    return dest


def prepare(work: Path, recipes: list[str], cache: Path) -> dict:
    from tmplbuild.sign import export_public, generate_key
    from tmplbuild.sign.keys import kill_agents

    older = older_recipes(work)
    home = work / "gnupg"
    fpr = generate_key("tmplbuild delta bench <bench@example.invalid>", home)
    repo = work / "repo"
    run([*tmplbuild(), "repo", "init", str(repo), "--id", "bench", "--key", fpr, "--gnupghome", str(home)])
    built = {}
    for name in recipes:
        pair = {}
        for label, recipe in (("older", older / f"{name}.toml"), ("newer", ROOT / "recipes" / f"{name}.toml")):
            out = work / label / name
            run([*tmplbuild(), "build", str(recipe), "--out", str(out), "--cache-dir", str(cache), "-q"])
            zst = next(out.glob("*.tar.zst"))
            pair[label] = str(zst)
        for label in ("older", "newer"):
            run([*tmplbuild(), "publish", "--skip-test", pair[label], "--repo", str(repo), "--key", fpr,
                 "--gnupghome", str(home), "-q"])
        built[name] = pair
    kill_agents(home)
    (work / "pub.asc").write_bytes(export_public(fpr, home, armored=True))
    return {"repo": str(repo), "fingerprint": fpr, "key": str(work / "pub.asc"), "built": built}


# -- phase 2: the fetches, in a network namespace (optionally throttled) ------------------------------------------

def measure(work: Path, plan: dict, repeat: int, throttle: str | None) -> dict:
    """Runs inside `unshare -n`: its own loopback, throttled with tc when `throttle` is given."""
    subprocess.run(["ip", "link", "set", "lo", "mtu", "1500", "up"], check=True)
    if throttle:
        subprocess.run(["tc", "qdisc", "add", "dev", "lo", "root", "tbf", "rate", throttle, "burst", "128kb",
                        "latency", "100ms"], check=True)
    from tests.test_server import Server  # the real server process, as the tests start it

    index = json.loads((Path(plan["repo"]) / "index.json").read_bytes())
    server = Server(Path(plan["repo"]), work / f"logs-{throttle or 'lo'}", workers=2)
    results = {}
    try:
        for name, pair in plan["built"].items():
            older, newer = Path(pair["older"]), Path(pair["newer"])
            node = work / f"node-{throttle or 'lo'}-{name}"
            env = {"TMPLBUILD_CONFIG_DIR": str(node / "config"), "TMPLBUILD_STATE_DIR": str(node / "state"),
                   "TMPLBUILD_SYSTEM_CONFIG_DIR": str(node / "etc"), "NO_PROXY": "*"}
            dest = node / "cache"
            dest.mkdir(parents=True)
            shutil.copy(older, dest / older.name)
            fetch = [*tmplbuild(), "fetch", name, "--arch", "amd64", "--dest", str(dest), "--url", server.url(""),
                     "--key", plan["key"], "--fingerprint", plan["fingerprint"], "--json"]
            entry = next(e for e in index["templates"] if e["name"] == name and e["path"].endswith(newer.name))
            delta = next(f for f in entry["files"] if f.get("format") == "tar.zst.delta")
            rows: dict[str, list[tuple[float, float]]] = {"full": [], "delta": [], "curl + sha256sum": []}
            for _ in range(repeat):
                for label, argv in (("full", [*fetch, "--no-delta"]), ("delta", fetch)):
                    (dest / newer.name).unlink(missing_ok=True)
                    wall, cpu, out = timed(argv, env)
                    got = json.loads(out)
                    assert (got["delta"] is not None) == (label == "delta"), out
                    rows[label].append((wall, cpu))
                target = node / "by-hand"
                target.unlink(missing_ok=True)
                wall, cpu, _ = timed(["sh", "-c", f'curl -sf -o "{target}" "{server.url("/" + entry["path"])}" && '
                                                  f'sha256sum "{target}" >/dev/null'], env)
                rows["curl + sha256sum"].append((wall, cpu))
            assert (dest / newer.name).read_bytes() == newer.read_bytes()
            results[name] = {
                "full_bytes": entry["size"], "delta_bytes": delta["size"],
                "delta_share": delta["size"] / entry["size"],
                **{label: {"wall_s": statistics.median(w for w, _ in r), "cpu_s": statistics.median(c for _, c in r)}
                   for label, r in rows.items()}}
    finally:
        server.stop()
    return results


def report(plan: dict, results: dict[str, dict]) -> bool:
    ok = True
    print(f"\n{'recipe':<20} {'full MB':>8} {'delta MB':>9} {'share':>6}   link      "
          f"{'full s':>7} {'delta s':>8} {'curl s':>7}   {'delta CPU s':>11} {'full CPU s':>10}")
    for name in plan["built"]:
        for link in ("127.0.0.1", THROTTLE):
            r = results[link][name]
            print(f"{name:<20} {r['full_bytes'] / 1e6:8.1f} {r['delta_bytes'] / 1e6:9.2f} "
                  f"{100 * r['delta_share']:5.1f}%   {link:<9} {r['full']['wall_s']:7.2f} "
                  f"{r['delta']['wall_s']:8.2f} {r['curl + sha256sum']['wall_s']:7.2f}   "
                  f"{r['delta']['cpu_s']:11.2f} {r['full']['cpu_s']:10.2f}")
    print()
    for name in plan["built"]:
        lo, slow = results["127.0.0.1"][name], results[THROTTLE][name]
        checks = [
            ("delta <= 10% of the full file", lo["delta_share"] <= 0.10, f"{100 * lo['delta_share']:.1f}%"),
            (f"delta update faster than a full fetch at {THROTTLE}", slow["delta"]["wall_s"] < slow["full"]["wall_s"],
             f"{slow['delta']['wall_s']:.2f} s vs {slow['full']['wall_s']:.2f} s"),
            ("a fetch with a delta <= 3 s of CPU", lo["delta"]["cpu_s"] <= 3.0, f"{lo['delta']['cpu_s']:.2f} s"),
        ]
        for what, passed, figure in checks:
            print(f"{name}: {what}: {figure}: {'ok' if passed else 'MISS'}")
            ok &= passed
    return ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipes", nargs="+", default=list(SHIPPED), metavar="NAME")
    ap.add_argument("--cache-dir", help="the builds' package cache (default: one of this run's own)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", metavar="FILE", help="also write the figures here")
    ap.add_argument("--work", metavar="DIR", help="keep the builds and the repository in DIR (kept afterwards), and "
                                                   "reuse what an earlier run with --prepare-only left there")
    ap.add_argument("--prepare-only", action="store_true", help="only build and publish (into --work)")
    ap.add_argument("--measure", metavar="PLAN", help=argparse.SUPPRESS)  # phase 2, inside unshare -n
    ap.add_argument("--throttle", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        work = Path(args.work)
        results = measure(work, json.loads(Path(args.measure).read_text()), args.repeat, args.throttle)
        (work / f"results-{args.throttle or 'lo'}.json").write_text(json.dumps(results))
        return 0
    if os.geteuid() != 0:
        raise SystemExit("needs root: real builds, and a network namespace with tc for the throttled link")
    with tempfile.TemporaryDirectory(prefix="tmplbuild-bench-delta-") as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        cache = Path(args.cache_dir) if args.cache_dir else work / "cache"
        if (work / "plan.json").exists():
            plan = json.loads((work / "plan.json").read_text())
            print(f"reusing the builds and repository in {work}", flush=True)
        else:
            print(f"building {len(args.recipes)} recipe(s) twice (with and without their update suites)…",
                  flush=True)
            plan = prepare(work, args.recipes, cache)
            (work / "plan.json").write_text(json.dumps(plan))
        if args.prepare_only:
            return 0
        for stale in work.glob("node-*"):
            shutil.rmtree(stale)
        results = {}
        for link, throttle in (("127.0.0.1", None), (THROTTLE, THROTTLE)):
            print(f"fetching on {link}…", flush=True)
            subprocess.run(["unshare", "-n", sys.executable, __file__, "--work", str(work), "--measure",
                            str(work / "plan.json"), "--repeat", str(args.repeat),
                            *(["--throttle", throttle] if throttle else [])], check=True, cwd=ROOT)
            results[link] = json.loads((work / f"results-{throttle or 'lo'}.json").read_text())
        ok = report(plan, results)
        if args.json:
            Path(args.json).write_text(json.dumps({"results": results, "goals_met": ok}, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
