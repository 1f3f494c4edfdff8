#!/usr/bin/env python3
"""What `publish --oci` costs in the registry: tmplbuild's push of a template's oci-archive (skopeo copy
--preserve-digests under the version tag and the moving tag, the digest check, simple signing of both tags), as a
whole Python process, against a bare `skopeo copy` of the same archive, each into a fresh repository of the same
Distribution registry on 127.0.0.1 (so every blob is uploaded every time). Goal: at most 1.2x.

Run: python3 bench/oci_push.py OUT/debian-12-minimal_..._amd64.manifest.json [--repeat N]. The build must have
"oci" in its formats (the shipped recipe has). See bench/README.md."""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))

from tests.oci_registry import Registry, make_key  # noqa: E402  (the tests' real registry, a throwaway key)

GOAL = 1.2
PUSH = """
import sys
from pathlib import Path
from tmplbuild.manifest import parse
from tmplbuild.oci.publisher import Destination, push
from tmplbuild.sign import Signer
path = Path(sys.argv[1])
with Signer(Path(sys.argv[3]), sys.argv[4]) as signer:
    push(parse(path.read_bytes()), path, Destination(prefix=sys.argv[2], tls_verify=False), signer)
"""


def timed(argv: list[str]) -> float:
    start = time.monotonic()
    proc = subprocess.run(argv, cwd=PROJECT, capture_output=True, text=True)
    secs = time.monotonic() - start
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        sys.exit(1)
    return secs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("manifest", type=Path)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    manifest = args.manifest.resolve()
    archive = manifest.with_name(json.loads(manifest.read_text())["oci"]["file"])
    session = Path(tempfile.mkdtemp(prefix="tmplbuild-bench-push-", dir="/var/tmp"))
    registry = Registry(session / "registry")
    home = session / "gnupg"
    try:
        fpr = make_key(home)
        policy = session / "policy.json"
        policy.write_text('{"default": [{"type": "insecureAcceptAnything"}]}')
        times: dict[str, list[float]] = {"skopeo copy": [], "tmplbuild push + sign": []}
        for i in range(args.repeat):
            times["skopeo copy"].append(timed([
                "skopeo", "--policy", str(policy), "copy", "--quiet", "--preserve-digests", "--dest-tls-verify=false",
                f"oci-archive:{archive}", f"docker://{registry.host}/bare{i}/image:t"]))
            times["tmplbuild push + sign"].append(timed([
                sys.executable, "-c", PUSH, str(manifest), f"{registry.host}/tb{i}", str(home), fpr]))
            print(f"round {i + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()), file=sys.stderr)
        bare, ours = (statistics.median(times[k]) for k in ("skopeo copy", "tmplbuild push + sign"))
        size = archive.stat().st_size / 1e6
        print(f"| push of {archive.name} ({size:.1f} MB) | seconds (median of {args.repeat}) | ratio |")
        print("|---|---|---|")
        print(f"| bare `skopeo copy --preserve-digests` (one tag) | {bare:.2f} | 1.00x |")
        print(f"| tmplbuild: both tags, digest check, two simple signatures | {ours:.2f} | {ours / bare:.2f}x "
              f"(goal <= {GOAL}x: {'PASS' if ours / bare <= GOAL else 'MISS'}) |")
    finally:
        registry.stop()
        subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "all"], capture_output=True)
        shutil.rmtree(session, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
