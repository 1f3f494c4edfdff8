#!/usr/bin/env python3
"""What `publish --oci` costs in the registry: tmplbuild's push of a template's oci-archive (skopeo copy
--preserve-digests under the version tag and the moving tag, the digest check, simple signing of both tags), as a
whole Python process, against a bare `skopeo copy` of the same archive, each into a Distribution registry of its
own on 127.0.0.1 that holds nothing yet, with a fresh HOME (no blob-info cache): every blob is uploaded every
time, as a new template version's are; and what `--oci` adds to a whole `tmplbuild publish` into a fresh
repository. Goal: at most 1.2x.

Run: python3 bench/oci_push.py OUT/debian-12-minimal_..._amd64.manifest.json [--repeat N]. The build must have
"oci" in its formats (the shipped recipe has). See bench/README.md."""
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


def timed(argv: list[str], session: Path) -> float:
    """The whole process, with a HOME of its own: skopeo's blob-info cache would otherwise remember where the
    blobs already are and mount them from another repository instead of uploading them."""
    home = Path(tempfile.mkdtemp(prefix="home-", dir=session))
    env = {**os.environ, "HOME": str(home), "XDG_RUNTIME_DIR": str(home), "XDG_CONFIG_HOME": str(home / ".config")}
    start = time.monotonic()
    proc = subprocess.run(argv, cwd=PROJECT, capture_output=True, text=True, env=env)
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
    home = session / "gnupg"
    registries: list[Registry] = []
    try:
        fpr = make_key(home)
        policy = session / "policy.json"
        policy.write_text('{"default": [{"type": "insecureAcceptAnything"}]}')
        times: dict[str, list[float]] = {"skopeo copy": [], "tmplbuild push + sign": [], "publish": [],
                                         "publish --oci": []}
        for i in range(args.repeat):
            # A registry of its own for each run: the image is new to it, as a new template version's layer is
            # new to the registry a weekly publish pushes to (a registry that has the blob only links it).
            bare, ours = (Registry(session / f"registry-{i}-{which}") for which in ("bare", "tmplbuild"))
            registries += [bare, ours]
            times["skopeo copy"].append(timed([
                "skopeo", "--policy", str(policy), "copy", "--quiet", "--preserve-digests", "--dest-tls-verify=false",
                f"oci-archive:{archive}", f"docker://{bare.host}/tmplbuild/image:t"], session))
            times["tmplbuild push + sign"].append(timed([
                sys.executable, "-c", PUSH, str(manifest), f"{ours.host}/tmplbuild", str(home), fpr], session))
            # What --oci adds to a publish (whose start-up, hashing and signing are paid either way).
            repos = []
            for which in ("plain", "oci"):
                repos.append(session / f"repo-{i}-{which}")
                subprocess.run([sys.executable, "-m", "tmplbuild", "repo", "init", str(repos[-1]), "--key", fpr,
                                "--gnupghome", str(home)], cwd=PROJECT, check=True, capture_output=True)
            publish = [sys.executable, "-m", "tmplbuild", "publish", "--skip-test", str(manifest), "--key", fpr,
                       "--gnupghome", str(home)]
            times["publish"].append(timed([*publish, "--repo", str(repos[0])], session))
            fresh = Registry(session / f"registry-{i}-publish")
            registries.append(fresh)
            times["publish --oci"].append(timed([*publish, "--repo", str(repos[1]), "--oci", f"{fresh.host}/pub",
                                                 "--oci-insecure-registry"], session))
            for r in (bare, ours, fresh):
                r.stop()
            print(f"round {i + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()), file=sys.stderr)
        bare, ours = (statistics.median(times[k]) for k in ("skopeo copy", "tmplbuild push + sign"))
        size = archive.stat().st_size / 1e6
        print(f"| push of {archive.name} ({size:.1f} MB) | seconds (median of {args.repeat}) | ratio |")
        print("|---|---|---|")
        print(f"| bare `skopeo copy --preserve-digests` (one tag) | {bare:.2f} | 1.00x |")
        print(f"| tmplbuild's push alone, a whole Python process: both tags, digest check, two simple signatures | "
              f"{ours:.2f} | {ours / bare:.2f}x (goal <= {GOAL}x: {'PASS' if ours / bare <= GOAL else 'MISS'}) |")
        plain_publish, oci_publish = (statistics.median(times[k]) for k in ("publish", "publish --oci"))
        added = oci_publish - plain_publish
        print(f"| what --oci adds to `tmplbuild publish` ({oci_publish:.2f} s against {plain_publish:.2f} s) | "
              f"{added:.2f} | {added / bare:.2f}x (goal <= {GOAL}x: {'PASS' if added / bare <= GOAL else 'MISS'}) |")
    finally:
        for r in registries:
            r.stop()
        subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "all"], capture_output=True)
        shutil.rmtree(session, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
