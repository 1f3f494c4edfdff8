#!/usr/bin/env python3
"""How long `tmplbuild affected` takes to answer "which of my templates carry openssl below the fixed version".

In one run, a fresh signed repository of --versions template versions (default 50: 5 templates x 10 versions),
each manifest listing --packages installed packages (default 150: the host's own dpkg database, names, versions,
sources and sizes as dpkg-query reports them, else plausible generated ones; openssl and libssl3 at a version
that varies per template version, some of them binNMUs), is served by `tmplbuild serve` on 127.0.0.1. Then:
  remote:  tmplbuild affected openssl --fixed 3.0.15-1~deb12u1 --url URL --root-key FPR  (or --key/--fingerprint
           with --pin key): the whole process, Python start-up included: index + signature fetched and verified,
           every manifest taken from the client's cache after its size and sha256 were checked against the
           signed index, the answer computed and printed, the state recorded;
  local:   tmplbuild affected openssl --fixed ... --repo DIR: the index verified with the repository's own trust,
           every manifest read and checked;
after one untimed warm-up run of each (it fills the manifest cache: that run is shown as "cold"), --repeat timed
runs each. Goal: the median and the max of the remote runs under 1 s. For scale: `tmplbuild --version` (start-up
alone) and the server's /api/v1/affected (curl, parsed manifests cached in the server)."""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from serve import start_ours, stop  # noqa: E402  (bench/serve.py: `tmplbuild serve` on a free port)

from tmplbuild.sign import export_public, generate_key  # noqa: E402
from tmplbuild.sign.keys import kill_agents  # noqa: E402

FIXED = "3.0.15-1~deb12u1"
GOAL = 1.0
# (openssl's source version, libssl3's binNMU suffix): below FIXED, at it, above it
OPENSSL = [("3.0.11-1~deb12u2", "+b1"), ("3.0.13-1~deb12u1", ""), ("3.0.15-1~deb12u1", "+b1"),
           ("3.0.16-1~deb12u1", ""), ("3.0.17-1~deb12u2", "")]


def client_command() -> list[str]:
    script = Path(sys.executable).parent / "tmplbuild"
    return [str(script)] if script.exists() else [sys.executable, "-m", "tmplbuild"]


def host_packages(n: int) -> list[dict]:
    """`n` installed packages from the host's dpkg database (openssl and libssl3 left out: added per template),
    else generated ones with plausible names, versions and sources."""
    fmt = "${Package}\t${Version}\t${Architecture}\t${source:Package}\t${source:Version}\t${Installed-Size}\n"
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f", fmt], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        out = ""
    found = []
    for line in sorted(out.splitlines()):
        name, version, arch, source, source_version, size = (line.split("\t") + [""] * 6)[:6]
        if name in ("openssl", "libssl3") or not version:
            continue
        found.append({"name": name, "version": version, "arch": arch, "installed_size_kib": int(size or 0),
                      "source": source or name, "source_version": source_version or version})
    rng = random.Random(1)
    if len(found) >= n:
        return sorted(rng.sample(found, n), key=lambda p: p["name"])
    while len(found) < n:
        i = len(found)
        source = f"src{i // 3}"
        version = f"{rng.randint(0, 9)}.{rng.randint(0, 40)}.{rng.randint(0, 9)}-{rng.randint(1, 5)}+deb12u{i % 4}"
        found.append({"name": f"lib{source}-{i % 3}", "version": version, "arch": "amd64",
                      "installed_size_kib": rng.randint(10, 9000), "source": source, "source_version": version})
    return found


def artifact(out: Path, name: str, version: str, created: str, packages: list[dict]) -> Path:
    """A template as `tmplbuild build` leaves it: a (tiny, random) tar.zst and its manifest."""
    stem = f"{name}_{version}_amd64"
    payload = os.urandom(1024)
    (out / f"{stem}.tar.zst").write_bytes(payload)
    manifest = {"schema": 1, "name": name, "version": version, "arch": "amd64", "distribution": "debian",
                "release": "12", "suite": "bookworm", "variant": name.rsplit("-", 1)[-1],
                "description": "affected benchmark", "created": created,
                "build": {"input_hash": "sha256:" + "0" * 64}, "packages": packages,
                "artifacts": [{"file": f"{stem}.tar.zst", "format": "tar.zst", "size": len(payload),
                               "sha256": hashlib.sha256(payload).hexdigest(),
                               "sha512": hashlib.sha512(payload).hexdigest()}]}
    path = out / f"{stem}.manifest.json"
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return path


def make_repository(work: Path, versions: int, n_packages: int, pin: str) -> tuple[Path, list[str], str]:
    """The signed repository, and the client's pins. Returns (repo, pins, a note on where the packages came from)."""
    home, root_home = work / "gnupg", work / "root-gnupg"
    fpr = generate_key("Bench <bench@example.invalid>", home, expire="1d")
    key = work / "pub.asc"
    key.write_bytes(export_public(fpr, home, armored=True))
    repo = work / "repo"
    run = lambda *a: subprocess.run([*client_command(), *a], check=True, cwd=ROOT, capture_output=True)  # noqa: E731
    run("repo", "init", str(repo), "--key", fpr, "--gnupghome", str(home), "--id", "bench")
    if pin == "root":
        root_fpr = generate_key("Bench root <root@example.invalid>", root_home, expire="1d")
        (work / "root.asc").write_bytes(export_public(root_fpr, root_home, armored=True))
        draft = work / "1.root.json"
        run("root", "init", str(draft), "--repo-id", "bench", "--root-key", str(work / "root.asc"), "--online-key",
            str(key))
        run("root", "sign", str(draft), "--key", root_fpr, "--gnupghome", str(root_home))
        run("root", "publish", str(draft), "--repo", str(repo))
        pins = ["--root-key", root_fpr]
    else:
        pins = ["--key", str(key), "--fingerprint", fpr]
    base = host_packages(n_packages - 2)
    out = work / "out"
    out.mkdir()
    built = []
    names = [f"debian-12-{v}" for v in ("minimal", "ssh", "web", "db", "build")]
    for i in range(versions):
        name, step = names[i % len(names)], i // len(names)
        source_version, binnmu = OPENSSL[(i + step) % len(OPENSSL)]
        ssl = [{"name": "libssl3", "version": source_version + binnmu, "arch": "amd64", "installed_size_kib": 6029,
                "source": "openssl", "source_version": source_version},
               {"name": "openssl", "version": source_version, "arch": "amd64", "installed_size_kib": 2308,
                "source": "openssl", "source_version": source_version}]
        packages = sorted(base + ssl, key=lambda p: p["name"])
        built.append(artifact(out, name, f"12-202611{step + 1:02d}", f"2026-11-{step + 1:02d}T00:00:00Z", packages))
    run("publish", "--skip-test", *map(str, built), "--repo", str(repo), "--key", fpr, "--gnupghome", str(home))
    shutil.rmtree(out)
    where = "the host's dpkg database" if shutil.which("dpkg-query") else "generated"
    return repo, pins, where


def timed(argv: list[str], env: dict[str, str]) -> tuple[float, subprocess.CompletedProcess[str]]:
    start = time.monotonic()
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, env={**os.environ, **env})
    elapsed = time.monotonic() - start
    if proc.returncode not in (0, 1):
        raise SystemExit(f"{' '.join(argv)}: exit {proc.returncode}: {proc.stderr.strip()}")
    return elapsed, proc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--versions", type=int, default=50, help="template versions in the repository (default 50)")
    ap.add_argument("--packages", type=int, default=150, help="packages per manifest (default 150)")
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--pin", choices=("root", "key"), default="root",
                    help="what the client pins: the root key's fingerprint (default) or the index key")
    args = ap.parse_args()
    for tool in ("gpg", "curl"):
        if not shutil.which(tool):
            raise SystemExit(f"bench/affected.py needs {tool}")
    # An installed tmplbuild has its bytecode compiled; a checkout would otherwise measure compiling it.
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "tmplbuild"), str(ROOT / "repo_server")],
                   check=True, stdout=subprocess.DEVNULL)
    work = Path(tempfile.mkdtemp(prefix="tmplbuild-bench-affected-", dir="/var/tmp"))
    server = None
    try:
        repo, pins, where = make_repository(work, args.versions, args.packages, args.pin)
        server, port = start_ours(repo, 2, work / "serve.log")
        url = f"http://127.0.0.1:{port}"
        env = {"TMPLBUILD_STATE_DIR": str(work / "state"), "TMPLBUILD_CONFIG_DIR": str(work / "config"),
               "TMPLBUILD_SYSTEM_CONFIG_DIR": str(work / "etc"), "NO_PROXY": "*"}
        query = [*client_command(), "affected", "openssl", "--fixed", FIXED]
        cases = {"remote": [*query, "--url", url, *pins], "local": [*query, "--repo", str(repo)]}
        results: dict[str, list[float]] = {}
        cold: dict[str, float] = {}
        answers = {}
        for label, argv in cases.items():
            cold[label], first = timed(argv + ["--json"], env)  # warm-up: fills the manifest cache
            answers[label] = json.loads(first.stdout)
            results[label] = [timed(argv, env)[0] for _ in range(args.repeat)]
        if answers["remote"] != answers["local"]:
            raise SystemExit("the remote and the local answers differ")
        api = f"{url}/api/v1/affected?package=openssl&fixed={FIXED}"
        timed(["curl", "-sf", "-o", "/dev/null", api], {})
        api_times = [timed(["curl", "-sf", "-o", "/dev/null", api], {})[0] for _ in range(args.repeat)]
        startup = statistics.median(timed([*client_command(), "--version"], {})[0] for _ in range(3))
    finally:
        if server is not None:
            stop(server)
        for home in (work / "gnupg", work / "root-gnupg"):
            if home.exists():
                kill_agents(home)
        shutil.rmtree(work, ignore_errors=True)

    doc = answers["remote"]
    n_pkgs = sum(len(a["packages"]) for a in doc["affected"])
    print(f"repository: {doc['checked']} template versions x {args.packages} packages ({where}), served by tmplbuild "
          f"serve on 127.0.0.1; the client pins {'the root key (--root-key)' if args.pin == 'root' else 'the index key'}"
          f"; answer: {len(doc['affected'])} template versions affected ({n_pkgs} packages); "
          f"median and max of {args.repeat} whole-process runs after a warm-up")
    print("| case | cold (s) | median (s) | max (s) | goal | result |\n|---|---|---|---|---|---|")
    ok = True
    for label, text in (("remote", "tmplbuild affected --url (index verified, manifests from the checked cache)"),
                        ("local", "tmplbuild affected --repo DIR (index verified, manifests read and checked)")):
        times = results[label]
        med, worst = statistics.median(times), max(times)
        passed = med < GOAL and worst < GOAL
        ok &= passed or label != "remote"
        print(f"| {text} | {cold[label]:.3f} | {med:.3f} | {worst:.3f} | < {GOAL:g} s | "
              f"{'PASS' if passed else 'MISS'} |")
    print(f"| for scale: curl {'/api/v1/affected'} (server cache warm) | | {statistics.median(api_times):.3f} | "
          f"{max(api_times):.3f} | | |")
    print(f"| for scale: tmplbuild --version (start-up) | | {startup:.3f} | | | |")
    for label, times in results.items():
        print(f"raw {label}: {', '.join(f'{t:.3f}' for t in times)}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
