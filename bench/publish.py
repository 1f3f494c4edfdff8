#!/usr/bin/env python3
"""How much time `tmplbuild publish` adds to a release, against doing the minimum by hand.

In one run, on the same ~60 MB template file (page cache warm for both), the median of --repeat runs of:
  by hand:   sha256sum FILE && gpg --detach-sign FILE
  tmplbuild: tmplbuild publish MANIFEST --repo R --key K   (the whole command, Python start-up included:
             copy + sha256 + sha512, a detached .asc per file, SHA256SUMS + .gpg, the new index signed,
             every new signature verified, the locked and journaled swap)
Goal: tmplbuild within 1.3x of the pair."""
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

from tmplbuild.sign import generate_key  # noqa: E402
from tmplbuild.sign.keys import kill_agents  # noqa: E402


def timed(argv: list[str], env: dict[str, str] | None = None) -> float:
    start = time.monotonic()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT,
                   env={**os.environ, **(env or {})})
    return time.monotonic() - start


def artifact(out: Path, version: str, payload: bytes) -> Path:
    import hashlib

    name = f"bench_{version}_amd64"
    tarball = out / f"{name}.tar.zst"
    tarball.write_bytes(payload)
    manifest = {"schema": 1, "name": "bench", "version": version, "arch": "amd64", "distribution": "debian",
                "release": "12", "variant": "bench", "description": "publish benchmark", "created": "2026-11-23T00:00:00Z",
                "build": {"input_hash": "sha256:" + "0" * 64}, "packages": [],
                "artifacts": [{"file": tarball.name, "format": "tar.zst", "size": len(payload),
                               "sha256": hashlib.sha256(payload).hexdigest(),
                               "sha512": hashlib.sha512(payload).hexdigest()}]}
    path = out / f"{name}.manifest.json"
    path.write_text(json.dumps(manifest))
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=int, default=60)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="tmplbuild-bench-publish-", dir="/var/tmp"))
    home = work / "gnupg"
    try:
        fpr = generate_key("Bench <bench@example.invalid>", home, expire="1d")
        repo = work / "repo"
        subprocess.run([sys.executable, "-m", "tmplbuild", "repo", "init", str(repo), "--key", fpr,
                        "--gnupghome", str(home)], check=True, cwd=ROOT, capture_output=True)
        # Incompressible, like a compressed template.
        payload = os.urandom(args.size_mb << 20)
        by_hand, ours = [], []
        for i in range(args.repeat):
            out = work / f"out{i}"
            out.mkdir()
            manifest = artifact(out, f"12-2026110{i}", payload)
            tarball = manifest.with_name(f"bench_12-2026110{i}_amd64.tar.zst")
            by_hand.append(timed(["sha256sum", str(tarball)]) + timed(
                ["gpg", "--homedir", str(home), "--batch", "--yes", "--local-user", fpr, "--detach-sign", str(tarball)]))
            # --deltas 0: the pair by hand makes no delta either (a delta's cost: docs/publishing.md, "Deltas").
            ours.append(timed([sys.executable, "-m", "tmplbuild", "publish", "--skip-test", "--deltas", "0", str(manifest),
                               "--repo", str(repo), "--key", fpr, "--gnupghome", str(home)]))
        hand, mine = statistics.median(by_hand), statistics.median(ours)
        print(f"template: {args.size_mb} MiB, median of {args.repeat}")
        print("| step | seconds | ratio |\n|---|---|---|")
        print(f"| sha256sum + gpg --detach-sign (by hand) | {hand:.2f} | 1.00x |")
        print(f"| tmplbuild publish (whole command) | {mine:.2f} | {mine / hand:.2f}x |")
        print(f"goal <= 1.3x: {'PASS' if mine / hand <= 1.3 else 'MISS'}")
    finally:
        kill_agents(home)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
