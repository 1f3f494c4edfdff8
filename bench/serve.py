#!/usr/bin/env python3
"""How `tmplbuild serve` (Flask under gunicorn, gthread workers, sendfile) compares with nginx serving the same
repository directory, on 127.0.0.1, in one run:

  1. requests per second for GET /index.json, 16 concurrent keep-alive clients for ~5 s (wrk if installed,
     else Python client processes);
  2. total throughput of 8 concurrent downloads of a ~200 MB template (random bytes, published with
     `tmplbuild publish`), by 8 curl processes; median of --rounds rounds, servers alternating; goal: ours at
     least 0.8x nginx;
  3. our server's peak RSS (master + workers, summed, sampled from /proc every 20 ms) during the 8 downloads,
     for the 200 MB and for a 50 MB file: it must not grow with the file size (sendfile, nothing buffered).

Both servers run 2 worker processes (the machine's cores); nginx with sendfile on and access_log off, ours
with its defaults (2 workers x 16 threads, no access log). Needs nginx, curl, gpg; wrk optional
(apt-get install wrk). Scratch space in /var/tmp, removed afterwards."""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from publish import artifact  # noqa: E402  (bench/publish.py: a template file + its build manifest)

from tmplbuild.sign import generate_key  # noqa: E402
from tmplbuild.sign.keys import kill_agents  # noqa: E402

RUNNER = """
import sys
from pathlib import Path
from tmplbuild.errors import TmplbuildError
from tmplbuild.serve import serve
try:
    serve(Path(sys.argv[1]), "127.0.0.1", 0, int(sys.argv[2]), None, 2 << 30)
except TmplbuildError as exc:
    sys.exit(f"tmplbuild: {exc}")
"""

NGINX_CONF = """
worker_processes {workers};
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 100000;
    types {{ application/json json; text/plain asc; application/zstd zst; }}
    default_type application/octet-stream;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    server {{
        listen 127.0.0.1:{port};
        root {root};
        location ~ /\\. {{ return 404; }}
    }}
}}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        proc = subprocess.run(["curl", "-sf", "-o", "/dev/null", url], capture_output=True)
        if proc.returncode == 0:
            return
        if time.monotonic() > deadline:
            raise SystemExit(f"no answer from {url}")
        time.sleep(0.1)


def cli_has_serve() -> bool:
    import argparse as ap

    from tmplbuild.cli import parser

    subs = [a for a in parser()._actions if isinstance(a, ap._SubParsersAction)]
    return bool(subs) and "serve" in subs[0].choices


def start_ours(repo: Path, workers: int, log: Path) -> tuple[subprocess.Popen, int]:
    if cli_has_serve():
        argv = [sys.executable, "-m", "tmplbuild", "serve", str(repo), "--host", "127.0.0.1", "--port", "0",
                "--workers", str(workers)]
    else:
        argv = [sys.executable, "-c", RUNNER, str(repo), str(workers)]
    out = log.with_suffix(".out")
    with open(out, "wb") as o, open(log, "wb") as e:
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=o, stderr=e, start_new_session=True)
    deadline = time.monotonic() + 30
    while not (m := re.search(r":(\d+), uploads", out.read_text())):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"tmplbuild serve did not start: {log.read_text()}")
        time.sleep(0.05)
    port = int(m.group(1))
    wait_http(f"http://127.0.0.1:{port}/healthz")
    return proc, port


def start_nginx(repo: Path, workers: int, prefix: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    prefix.mkdir()
    conf = prefix / "nginx.conf"
    conf.write_text(NGINX_CONF.format(workers=workers, prefix=prefix, port=port, root=repo))
    proc = subprocess.Popen(["nginx", "-c", str(conf), "-p", str(prefix), "-g", "daemon off;"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    wait_http(f"http://127.0.0.1:{port}/index.json")
    return proc, port


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# ------------------------------------------------------------------------------------ 1. requests per second


def rps(url: str, seconds: float, clients: int) -> float:
    if shutil.which("wrk"):
        out = subprocess.run(["wrk", "-t", "2", "-c", str(clients), "-d", f"{seconds:g}s", url],
                             capture_output=True, text=True, check=True).stdout
        non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
        if non2xx:
            raise SystemExit(f"wrk saw errors against {url}:\n{out}")
        return float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    return _python_rps(url, seconds, clients)


_CLIENT = """
import sys, time, threading, requests
url, seconds, threads = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
counts = [0] * threads
end = time.monotonic() + seconds
def run(i):
    s = requests.Session()
    while time.monotonic() < end:
        r = s.get(url)
        assert r.status_code == 200
        counts[i] += 1
ts = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
[t.start() for t in ts]; [t.join() for t in ts]
print(sum(counts))
"""


def _python_rps(url: str, seconds: float, clients: int) -> float:
    procs = 4  # one GIL-bound process would measure the client, not the server
    ps = [subprocess.Popen([sys.executable, "-c", _CLIENT, url, str(seconds), str(clients // procs)],
                           stdout=subprocess.PIPE, text=True) for _ in range(procs)]
    return sum(int(p.communicate()[0]) for p in ps) / seconds


# ------------------------------------------------------------------------------------ 2 + 3. downloads, RSS


class RssSampler:
    """Peak of the summed VmRSS of a process and all its descendants, sampled every 20 ms."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self._stop = pid, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def sample(self) -> int:
        parents: dict[int, int] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as f:
                        parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    pass
        tree, frontier = {self.pid}, [self.pid]
        while frontier:
            p = frontier.pop()
            for child, parent in parents.items():
                if parent == p and child not in tree:
                    tree.add(child)
                    frontier.append(child)
        total = 0
        for p in tree:
            try:
                with open(f"/proc/{p}/status") as f:
                    total += int(re.search(r"VmRSS:\s+(\d+) kB", f.read()).group(1)) * 1024
            except (OSError, AttributeError):
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.sample())
            time.sleep(0.02)


def downloads(url: str, n: int, size: int) -> float:
    """Total MB/s of n concurrent curl downloads of `url` (each must deliver all `size` bytes)."""
    start = time.monotonic()
    ps = [subprocess.Popen(["curl", "-s", "-o", "/dev/null", "-w", "%{size_download}", url], stdout=subprocess.PIPE,
                           text=True) for _ in range(n)]
    got = [int(p.communicate()[0] or 0) for p in ps]
    elapsed = time.monotonic() - start
    if any(g != size for g in got):
        raise SystemExit(f"incomplete download from {url}: {got} of {size}")
    return n * size / 1e6 / elapsed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--big-mb", type=int, default=200)
    ap.add_argument("--small-mb", type=int, default=50)
    ap.add_argument("--downloads", type=int, default=8)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--json", help="write the raw results here")
    args = ap.parse_args()
    for tool in ("nginx", "curl", "gpg"):
        if not shutil.which(tool):
            raise SystemExit(f"bench/serve.py needs {tool}")

    work = Path(tempfile.mkdtemp(prefix="tmplbuild-bench-serve-", dir="/var/tmp"))
    home = work / "gnupg"
    procs: list[subprocess.Popen] = []
    try:
        fpr = generate_key("Bench <bench@example.invalid>", home, expire="1d")
        repo = work / "repo"
        run = lambda *a: subprocess.run([sys.executable, "-m", "tmplbuild", *a], cwd=ROOT, check=True,  # noqa: E731
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        run("repo", "init", str(repo), "--key", fpr, "--gnupghome", str(home), "--id", "bench")
        sizes = {"big": args.big_mb * 1_000_000, "small": args.small_mb * 1_000_000}
        paths = {}
        for label, version in (("big", "1"), ("small", "2")):
            out = work / f"out-{label}"
            out.mkdir()
            run("publish", "--skip-test", str(artifact(out, version, os.urandom(sizes[label]))), "--repo", str(repo), "--key", fpr,
                "--gnupghome", str(home))
            paths[label] = f"/templates/bench/{version}/bench_{version}_amd64.tar.zst"
            shutil.rmtree(out)
        for p in [work, *work.rglob("*")]:  # nginx workers run as nobody
            if p.is_relative_to(repo) or p == work:
                p.chmod(0o755 if p.is_dir() else 0o644)

        ours, our_port = start_ours(repo, args.workers, work / "serve.log")
        procs.append(ours)
        nginx, nginx_port = start_nginx(repo, args.workers, work / "nginx")
        procs.append(nginx)
        base = {"ours": f"http://127.0.0.1:{our_port}", "nginx": f"http://127.0.0.1:{nginx_port}"}
        # same bytes from both
        for label in ("big",):
            for who in base:
                downloads(base[who] + paths[label], 1, sizes[label])

        results: dict[str, dict] = {"ours": {}, "nginx": {}}
        idle = RssSampler(ours.pid).sample()
        # 1. requests per second, index.json (warm-up 1 s first)
        for who in ("ours", "nginx"):
            rps(base[who] + "/index.json", 1, args.clients)
            results[who]["rps"] = rps(base[who] + "/index.json", args.seconds, args.clients)
        # 2. + 3. downloads, alternating servers each round; RSS of ours sampled throughout
        for label in ("big", "small"):
            runs: dict[str, list[float]] = {"ours": [], "nginx": []}
            peak = 0
            for r in range(args.rounds):
                for who in (("ours", "nginx") if r % 2 == 0 else ("nginx", "ours")):
                    if who == "ours":
                        with RssSampler(ours.pid) as sampler:
                            runs[who].append(downloads(base[who] + paths[label], args.downloads, sizes[label]))
                        peak = max(peak, sampler.peak)
                    else:
                        runs[who].append(downloads(base[who] + paths[label], args.downloads, sizes[label]))
            for who in runs:
                results[who][f"mbps_{label}"] = statistics.median(runs[who])
                results[who][f"mbps_{label}_runs"] = runs[who]
            results["ours"][f"peak_rss_{label}"] = peak
        results["ours"]["idle_rss"] = idle
    finally:
        for p in procs:
            stop(p)
        kill_agents(home)
        shutil.rmtree(work, ignore_errors=True)

    o, n = results["ours"], results["nginx"]
    ratio = o["mbps_big"] / n["mbps_big"]
    mib = lambda b: f"{b / 2**20:.0f} MiB"  # noqa: E731
    rows = [
        ("metric", "tmplbuild serve", "nginx", "ours / nginx", "goal", "result"),
        (f"GET /index.json, {args.clients} keep-alive clients, {args.seconds:g} s (req/s)",
         f"{o['rps']:.0f}", f"{n['rps']:.0f}", f"{o['rps'] / n['rps']:.2f}x", "", ""),
        (f"{args.downloads} concurrent downloads of {args.big_mb} MB, total MB/s (median of {args.rounds})",
         f"{o['mbps_big']:.0f}", f"{n['mbps_big']:.0f}", f"{ratio:.2f}x", "≥ 0.8x", "PASS" if ratio >= 0.8 else "FAIL"),
        (f"{args.downloads} concurrent downloads of {args.small_mb} MB, total MB/s (median of {args.rounds})",
         f"{o['mbps_small']:.0f}", f"{n['mbps_small']:.0f}", f"{o['mbps_small'] / n['mbps_small']:.2f}x", "", ""),
        ("our peak RSS, master + workers, idle", mib(o["idle_rss"]), "", "", "", ""),
        (f"our peak RSS during {args.downloads} x {args.big_mb} MB", mib(o["peak_rss_big"]), "", "", "", ""),
        (f"our peak RSS during {args.downloads} x {args.small_mb} MB", mib(o["peak_rss_small"]), "", "", "",
         ""),
    ]
    growth = o["peak_rss_big"] - o["peak_rss_small"]
    print(f"tmplbuild serve: {args.workers} gunicorn gthread workers x 16 threads, sendfile; nginx "
          f"{args.workers} workers, sendfile on; 127.0.0.1; {os.cpu_count()} cores; "
          f"rps client: {'wrk -t2' if shutil.which('wrk') else 'Python (4 processes)'}; downloads: curl")
    print()
    for i, row in enumerate(rows):
        print("| " + " | ".join(row) + " |")
        if i == 0:
            print("|" + "---|" * len(row))
    print()
    print(f"RSS difference between the {args.big_mb} MB and the {args.small_mb} MB runs: {growth / 2**20:+.1f} MiB "
          f"(file sizes differ by {args.big_mb - args.small_mb} MB)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
