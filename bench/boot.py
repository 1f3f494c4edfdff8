#!/usr/bin/env python3
"""How long `tmplbuild test` takes per container manager, and where the time goes.

For each template (by default the shipped debian-12-minimal, built here with the shared package cache) and
each manager, the median of --repeat runs of the whole command, Python start-up included:

    tmplbuild test TEMPLATE --manager M --json

The command boots two containers per manager (they must differ: machine-id, host keys), checks them and
powers them off. Beside it, in the same run, the reference: what booting one container of the same template by
hand costs with the manager's own tools (unpack with tar, start, `systemctl is-system-running --wait`,
power off), on a tmpfs as `tmplbuild test` uses. The report's per-phase times (unpack, boot, checks, shutdown) say what dominates.
Goal: under 30 s per manager for the minimal template on this 2-core machine. Run as root."""
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

from tmplbuild.boot.managers import MANAGERS, forget_lxc_locks  # noqa: E402

PY = sys.executable


def build_minimal(out: Path, cache: Path) -> Path:
    subprocess.run([PY, "-m", "tmplbuild", "build", "debian-12-minimal", "--out", str(out), "--cache-dir", str(cache)],
                   cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return next(out.glob("debian-12-minimal_*_amd64.tar.zst"))


def run_test(artifact: Path, manager: str, work: Path) -> tuple[float, dict]:
    start = time.monotonic()
    res = subprocess.run([PY, "-m", "tmplbuild", "test", str(artifact), "--manager", manager, "--json",
                          "--work-dir", str(work)], cwd=ROOT, capture_output=True, text=True)
    elapsed = time.monotonic() - start
    if res.returncode not in (0, 8):
        raise SystemExit(f"tmplbuild test --manager {manager} exited {res.returncode}: {res.stderr[-500:]}")
    return elapsed, json.loads(res.stdout)


def by_hand(artifact: Path, manager: str, work: Path) -> float | None:
    """One container booted to a settled state and powered off with the manager's own tools, no network."""
    top = Path(tempfile.mkdtemp(dir=work))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0711", "benchhand", str(top)], check=True)  # as tmplbuild test
    root = top / "rootfs"
    root.mkdir()
    start = time.monotonic()
    subprocess.run(["tar", "--zstd", "-xpf", str(artifact), "--numeric-owner", "-C", str(root)], check=True)
    try:
        if manager == "nspawn":
            proc = subprocess.Popen(["systemd-nspawn", "--register=no", "--keep-unit", "-q", "-b", "-D", str(root),
                                     "-M", "benchhand", "--private-network", "--console=read-only"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            leader = None
            while leader is None:
                kids = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
                leader = int(kids[0]) if kids else None
                time.sleep(0.02)
            while subprocess.run(["nsenter", "-t", str(leader), "-a", "systemctl", "is-system-running", "--wait"],
                                 capture_output=True).stdout.strip() in (b"", b"offline"):
                time.sleep(0.05)
            os.kill(leader, 38)  # SIGRTMIN+4: power off
            proc.wait(60)
        elif manager == "lxc":
            cfg = root.parent / "config"
            cfg.write_text(f"lxc.include = /usr/share/lxc/config/debian.common.conf\nlxc.uts.name = benchhand\n"
                           f"lxc.rootfs.path = dir:{root}\nlxc.apparmor.profile = unconfined\nlxc.net.0.type = empty\n")
            subprocess.run(["lxc-start", "-n", "benchhand", "-P", str(root.parent), "-f", str(cfg), "-d"], check=True)
            subprocess.run(["lxc-attach", "-n", "benchhand", "-P", str(root.parent), "--", "systemctl",
                            "is-system-running", "--wait"], capture_output=True)
            subprocess.run(["lxc-stop", "-n", "benchhand", "-P", str(root.parent), "-t", "60"], check=True)
        else:
            return None
        return time.monotonic() - start
    finally:
        forget_lxc_locks(top)
        subprocess.run(["umount", "--lazy", str(top)], check=False)
        shutil.rmtree(top, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifacts", nargs="*", type=Path, help="templates (default: build debian-12-minimal)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--manager", action="append", help="default: every manager available here")
    ap.add_argument("--cache-dir", type=Path, default=Path(os.environ.get("TMPLBUILD_CACHE_DIR", "/var/cache/tmplbuild")))
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: it boots containers")
    managers = args.manager or [n for n, cls in MANAGERS.items() if cls.available() is None]
    work = Path(tempfile.mkdtemp(prefix="tmplbuild-bench-boot-", dir="/var/tmp"))
    work.chmod(0o711)
    try:
        artifacts = args.artifacts or [build_minimal(work / "out", args.cache_dir)]
        rows = []
        for artifact in artifacts:
            size = artifact.stat().st_size / 1e6
            for manager in managers:
                times, phases, hand, verdicts = [], [], [], []
                for _ in range(args.repeat):
                    elapsed, report = run_test(artifact, manager, work)
                    times.append(elapsed)
                    m = report["managers"][0]
                    phases.append(m.get("phases", {}))
                    verdicts.append(m["status"] + ("" if m["status"] == "pass" else
                                    " (" + ", ".join(c["name"] for c in m["checks"] if c["status"] == "fail") + ")"))
                    h = by_hand(artifact, manager, work)
                    if h is not None:
                        hand.append(h)
                verdict = " / ".join(sorted(set(verdicts))) if len(set(verdicts)) > 1 else verdicts[0]
                med = {k: statistics.median(p.get(k, 0.0) for p in phases) for k in ("unpack", "boot", "checks", "shutdown")}
                rows.append((artifact.name, f"{size:.0f}", manager, statistics.median(times), min(times), max(times),
                             med, statistics.median(hand) if hand else None, verdict))
                print(f"{artifact.name} {manager}: {statistics.median(times):.1f} s ({verdict})", file=sys.stderr)
        print("| template | MB | manager | `tmplbuild test` s (median) | min–max | unpack | boot | checks | shutdown "
              "| one container by hand | result |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for name, size, manager, med, lo, hi, ph, hand, verdict in rows:
            print(f"| {name} | {size} | {manager} | {med:.1f} | {lo:.1f}–{hi:.1f} | {ph['unpack']:.1f} | {ph['boot']:.1f} "
                  f"| {ph['checks']:.1f} | {ph['shutdown']:.1f} | {'' if hand is None else f'{hand:.1f}'} | {verdict} |")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
