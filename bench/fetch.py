#!/usr/bin/env python3
"""What `tmplbuild fetch` costs over the bare minimum, on 127.0.0.1.

In one run, a ~200 MB template (random bytes, like a compressed one) is published in a fresh signed repository
served by nginx (sendfile; `python -m http.server` when nginx is missing), then the median of --repeat runs of:
  by hand:   curl -s -o FILE URL && sha256sum FILE
  tmplbuild: tmplbuild fetch NAME --url URL --key K --fingerprint F --dest D   (the whole command, Python
             start-up included: index + signature download and verification, every check, the capped .part
             download with sha256 AND sha512 computed while it arrives, fsync, rename, state update)
The destination file is removed before every run (otherwise fetch finds it "already present and verified").
For scale it also times curl alone: coreutils' sha256sum may not use the CPU's SHA extensions while Python's
hashlib (OpenSSL) does, which can make the pair slower than the download it checks.
Two cases, each against the pair in the same run: the shipped debian-12-minimal template, built now from its
recipe (or --template), where start-up and index verification weigh most (goal <= 1.2x), and ~200 MB of
random bytes, where the transfer and hashing do (goal <= 1.1x).
--pin root (the default) gives the repository a signed root naming the signing key as its online key, and the
client pins only the root key's fingerprint (`--root-key`): every fetch then also asks for the next root (a 404
while there is none) and verifies the index against the online keys of the root it stored on the first run,
the case a node admin has. --pin key pins the index key itself, as before roots."""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tmplbuild.sign import export_public, generate_key  # noqa: E402
from tmplbuild.sign.keys import kill_agents  # noqa: E402

NGINX_CONF = """daemon off;
master_process off;
worker_processes 1;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log;
events {{ worker_connections 64; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    types {{ }}
    default_type application/octet-stream;
    client_body_temp_path {work}/nginx-tmp;
    proxy_temp_path {work}/nginx-tmp;
    fastcgi_temp_path {work}/nginx-tmp;
    uwsgi_temp_path {work}/nginx-tmp;
    scgi_temp_path {work}/nginx-tmp;
    server {{
        listen 127.0.0.1:{port};
        root {root};
        location ~ /\\. {{ deny all; }}
    }}
}}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(port: int) -> None:
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"server on port {port} did not start")


def timed(argv: list[str], env: dict[str, str] | None = None) -> float:
    start = time.monotonic()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT,
                   env={**os.environ, **(env or {})})
    return time.monotonic() - start


def artifact(out: Path, version: str, size: int) -> Path:
    name = f"bench_{version}_amd64"
    tarball = out / f"{name}.tar.zst"
    h256, h512 = hashlib.sha256(), hashlib.sha512()
    with open(tarball, "wb") as f:
        left = size
        while left:
            chunk = os.urandom(min(left, 1 << 20))
            f.write(chunk)
            h256.update(chunk)
            h512.update(chunk)
            left -= len(chunk)
    manifest = {"schema": 1, "name": "bench", "version": version, "arch": "amd64", "distribution": "debian",
                "release": "12", "variant": "bench", "description": "fetch benchmark",
                "created": "2026-11-23T00:00:00Z", "build": {"input_hash": "sha256:" + "0" * 64}, "packages": [],
                "artifacts": [{"file": tarball.name, "format": "tar.zst", "size": size, "sha256": h256.hexdigest(),
                               "sha512": h512.hexdigest()}]}
    path = out / f"{name}.manifest.json"
    path.write_text(json.dumps(manifest))
    return path


def client_command() -> list[str]:
    """What an admin runs: the installed `tmplbuild` entry point (a whole process, start-up included)."""
    script = Path(sys.executable).parent / "tmplbuild"
    return [str(script)] if script.exists() else [sys.executable, "-m", "tmplbuild"]


def shipped_template(work: Path, cache: Path) -> Path:
    """Build the shipped debian-12-minimal recipe (the template admins fetch most) and return its manifest."""
    out = work / "shipped"
    subprocess.run([*client_command(), "build", "recipes/debian-12-minimal.toml", "--out", str(out), "--cache-dir",
                    str(cache)], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return next(out.glob("*.manifest.json"))


def serve(root: Path, work: Path, port: int, use: str) -> tuple[subprocess.Popen, str]:
    if use == "nginx" and shutil.which("nginx"):
        (work / "nginx-tmp").mkdir()
        conf = work / "nginx.conf"
        conf.write_text(NGINX_CONF.format(work=work, port=port, root=root))
        proc = subprocess.Popen(["nginx", "-c", str(conf), "-p", str(work)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        return proc, "nginx (sendfile)"
    proc = subprocess.Popen([sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port), "--directory",
                             str(root)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, "python -m http.server"


def measure(label: str, fetch: list[str], env: dict[str, str], dest: Path, name: str, url: str, work: Path,
            repeat: int, goal: float) -> bool:
    by_hand_file = work / "curl.out"

    def by_hand() -> float:
        by_hand_file.unlink(missing_ok=True)
        return timed(["curl", "-s", "-o", str(by_hand_file), url]) + timed(["sha256sum", str(by_hand_file)])

    def ours() -> float:
        (dest / name).unlink(missing_ok=True)
        return timed(fetch, env)

    def curl_only() -> float:
        by_hand_file.unlink(missing_ok=True)
        return timed(["curl", "-s", "-o", str(by_hand_file), url])

    by_hand(), ours()  # warm-up: page cache, gpg, Python's bytecode cache
    hand, mine, transfer = [], [], []
    for _ in range(repeat):
        hand.append(by_hand())
        mine.append(ours())
        transfer.append(curl_only())
    already = timed(fetch, env)  # the file is there now: index check + hashing only
    version = timed([*client_command(), "--version"])
    h, m = statistics.median(hand), statistics.median(mine)
    size = (dest / name).stat().st_size
    print(f"\n{label}: {name}, {size / 1e6:.1f} MB, median of {repeat}")
    print("| step | seconds | ratio |\n|---|---|---|")
    print(f"| curl -s -o FILE URL && sha256sum FILE | {h:.3f} | 1.00x |")
    print(f"| tmplbuild fetch (whole command, verification included) | {m:.3f} | {m / h:.2f}x |")
    c = statistics.median(transfer)
    print(f"| for scale: curl -s -o FILE URL alone (no hash) | {c:.3f} | {c / h:.2f}x |")
    print(f"| tmplbuild fetch, file already present (index check + sha256/sha512 of the file) | {already:.3f} | "
          f"{already / h:.2f}x |")
    print(f"| for scale: tmplbuild --version (start-up) | {version:.3f} | {version / h:.2f}x |")
    ok = m / h <= goal
    print(f"goal <= {goal}x: {'PASS' if ok else 'MISS'}")
    print(f"raw: curl+sha256sum {', '.join(f'{t:.3f}' for t in hand)}; tmplbuild {', '.join(f'{t:.3f}' for t in mine)}")
    return ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=int, default=200, help="the random-bytes case (0: skip it)")
    ap.add_argument("--template", metavar="MANIFEST", help="the shipped-template case: a built .manifest.json "
                    "(default: build recipes/debian-12-minimal.toml now)")
    ap.add_argument("--no-shipped", action="store_true", help="skip the shipped-template case")
    ap.add_argument("--cache-dir", default=os.environ.get("TMPLBUILD_CACHE_DIR", "/var/cache/tmplbuild"),
                    help="package cache for building the shipped template")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--server", choices=("nginx", "http.server"), default="nginx")
    ap.add_argument("--pin", choices=("root", "key"), default="root",
                    help="what the client pins: the root key's fingerprint (default) or the index key")
    args = ap.parse_args()
    # An installed tmplbuild has its bytecode compiled (pip does it); a checkout run with PYTHONDONTWRITEBYTECODE
    # would compile every module on every run and measure that instead.
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "tmplbuild")], check=True,
                   stdout=subprocess.DEVNULL)
    work = Path(tempfile.mkdtemp(prefix="tmplbuild-bench-fetch-", dir="/var/tmp"))
    os.chmod(work, 0o755)
    home = work / "gnupg"
    root_home = work / "root-gnupg"
    server = None
    ok = True
    try:
        fpr = generate_key("Bench <bench@example.invalid>", home, expire="1d")
        key = work / "pub.asc"
        key.write_bytes(export_public(fpr, home, armored=True))
        repo = work / "repo"
        subprocess.run([*client_command(), "repo", "init", str(repo), "--key", fpr, "--gnupghome", str(home)],
                       check=True, cwd=ROOT, capture_output=True)
        if args.pin == "root":
            root_fpr = generate_key("Bench root <root@example.invalid>", root_home, expire="1d")
            (work / "root.asc").write_bytes(export_public(root_fpr, root_home, armored=True))
            draft = work / "1.root.json"
            for verb in (["init", str(draft), "--repo-id", "repo", "--root-key", str(work / "root.asc"),
                          "--online-key", str(key)],
                         ["sign", str(draft), "--key", root_fpr, "--gnupghome", str(root_home)],
                         ["publish", str(draft), "--repo", str(repo)]):
                subprocess.run([*client_command(), "root", *verb], check=True, cwd=ROOT, capture_output=True)
            pins = ["--root-key", root_fpr]
        else:
            pins = ["--key", str(key), "--fingerprint", fpr]
        (work / "out").mkdir()
        cases = []
        if args.size_mb:
            cases.append((f"random bytes ({args.size_mb} MiB, like a compressed template)",
                          artifact(work / "out", "12-20261123", args.size_mb << 20)))
        if not args.no_shipped:
            cases.append(("the shipped template (debian-12-minimal, tar.zst)",
                          Path(args.template) if args.template else shipped_template(work, Path(args.cache_dir))))
        keys = [(json.loads(m.read_text())["name"], json.loads(m.read_text())["version"]) for _, m in cases]
        for _, manifest in cases:
            subprocess.run([*client_command(), "publish", "--skip-test", str(manifest), "--repo", str(repo), "--key",
                            fpr, "--gnupghome", str(home)], check=True, cwd=ROOT, capture_output=True)
        shutil.rmtree(work / "out")
        shutil.rmtree(work / "shipped", ignore_errors=True)
        port = free_port()
        server, server_name = serve(repo, work, port, args.server)
        wait_for(port)
        base = f"http://127.0.0.1:{port}"
        print(f"served by {server_name} on 127.0.0.1; the whole `tmplbuild fetch` process against curl + sha256sum; "
              f"the client pins {'the root key (--root-key)' if args.pin == 'root' else 'the index key (--key)'}")
        for (label, _), wanted in zip(cases, keys):
            entry = next(e for e in json.loads((repo / "index.json").read_text())["templates"]
                         if (e["name"], e["version"]) == wanted)
            name = entry["path"].rsplit("/", 1)[1]
            dest = work / f"dest-{entry['name']}"
            dest.mkdir()
            env = {"TMPLBUILD_STATE_DIR": str(work / "state"), "TMPLBUILD_CONFIG_DIR": str(work / "config"),
                   "TMPLBUILD_SYSTEM_CONFIG_DIR": str(work / "etc"), "NO_PROXY": "*"}
            fetch = [*client_command(), "fetch", entry["name"], "--version", entry["version"], "--arch", "amd64",
                     "--dest", str(dest), "--url", base, *pins]
            ok &= measure(label, fetch, env, dest, name, f"{base}/{entry['path']}", work, args.repeat,
                          1.2 if "shipped" in label else 1.1)
    finally:
        if server is not None:
            server.terminate()
            server.wait()
        kill_agents(home)
        if root_home.exists():
            kill_agents(root_home)
        shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
