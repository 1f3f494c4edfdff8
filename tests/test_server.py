"""The repository server (`tmplbuild serve`, repo_server/): a real gunicorn process on 127.0.0.1 serving a
repository made with `tmplbuild repo init` + `publish`, plus Flask's test client where that is enough.

Uploads are built the way a legitimate publisher builds them: repository A is served; a copy B gets a local
`tmplbuild publish`; the upload is every file that differs between B and A, plus B's index pair."""
from __future__ import annotations

import argparse
import html.parser
import io
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from tests.conftest import ROOT, gpg
from tests.test_repo import index_of, make_artifact, other_key, publish, tmplbuild
from tmplbuild.errors import UnsafeContentError, UsageError
from tmplbuild.manifest import Package

V1, V2 = "12-20261120", "12-20261130"
TARBALL = f"templates/demo/{V1}/demo_{V1}_amd64.tar.zst"
SECRET = b"OUTSIDE-SECRET-6f1d"

# Until tmplbuild/cli.py has the `serve` verb, the server is started through this stand-in, which parses the
# same options and maps errors to exit codes the way cli.main does. Once the verb exists, `serve_argv` uses
# `python -m tmplbuild serve` automatically.
RUNNER = """
import argparse, sys
from pathlib import Path
from tmplbuild.errors import TmplbuildError
from tmplbuild.serve import parse_size, serve
p = argparse.ArgumentParser()
p.add_argument("repo")
p.add_argument("--host", default="127.0.0.1")
p.add_argument("--port", type=int, default=8080)
p.add_argument("--workers", type=int, default=2)
p.add_argument("--token-file")
p.add_argument("--max-upload", default="2G")
a = p.parse_args()
try:
    serve(Path(a.repo), a.host, a.port, a.workers, Path(a.token_file) if a.token_file else None,
          parse_size(a.max_upload))
except TmplbuildError as exc:
    print(f"tmplbuild: {exc}", file=sys.stderr)
    sys.exit(int(exc.exit_code))
"""


def cli_has_serve() -> bool:
    from tmplbuild.cli import parser

    subs = [a for a in parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return bool(subs) and "serve" in subs[0].choices


def serve_argv(*args: str) -> list[str]:
    if cli_has_serve():
        return [sys.executable, "-m", "tmplbuild", "serve", *args]
    return [sys.executable, "-c", RUNNER, *args]


class Server:
    """`tmplbuild serve REPO --port 0 ...` as a real process (its own session, so master and workers go
    together); the port is read from the start-up line."""

    def __init__(self, repo: Path, logs: Path, *args: str, workers: int = 1) -> None:
        logs.mkdir(parents=True, exist_ok=True)
        n = len(list(logs.glob("out-*")))
        self.out, self.err = logs / f"out-{n}", logs / f"err-{n}"
        with open(self.out, "wb") as out, open(self.err, "wb") as err:
            self.proc = subprocess.Popen(serve_argv(str(repo), "--host", "127.0.0.1", "--port", "0", "--workers",
                                                    str(workers), *args),
                                         cwd=ROOT, stdout=out, stderr=err, start_new_session=True)
        deadline = time.monotonic() + 30
        while True:
            line = self.out.read_text()
            m = re.search(r"on http://127\.0\.0\.1:(\d+), uploads (enabled|disabled)", line)
            if m:
                self.port, self.uploads = int(m.group(1)), m.group(2)
                self.first_line = line.splitlines()[0]
                break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"server did not start: {self.err.read_text()}")
            time.sleep(0.05)
        self.base = f"http://127.0.0.1:{self.port}"
        while True:  # the listening socket exists before the line; wait for a worker to answer
            try:
                requests.get(self.base + "/healthz", timeout=5)
                break
            except requests.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def url(self, path: str) -> str:
        return self.base + path

    def kill(self) -> None:
        """SIGKILL to master and workers at once: no clean-up of any kind."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()
        try:  # workers are in the same session; make sure none outlives the test
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def raw_get(port: int, target: bytes) -> tuple[int, bytes]:
    """Send the request line exactly as given (no client-side normalisation of dots or escapes)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET " + target + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    status = int(data.split(b" ", 2)[1])
    return status, data


def make_key(base: Path) -> tuple[Path, str]:
    """A maintainer's key, as tests/test_repo.py's `key` fixture makes it (`tmplbuild key generate`)."""
    home = base / "gnupg"
    proc = tmplbuild("key", "generate", "--name", "Test Templates <t@example.invalid>", "--gnupghome", str(home),
                     "--out", str(base / "pub.asc"))
    assert proc.returncode == 0, proc.stderr
    return home, proc.stdout.strip()


def kill_agents(home: Path) -> None:
    subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "all"], capture_output=True)


def init_repo(root: Path, key: tuple[Path, str]) -> Path:
    home, fpr = key
    proc = tmplbuild("repo", "init", str(root), "--key", fpr, "--gnupghome", str(home), "--id", "test-repo")
    assert proc.returncode == 0, proc.stderr
    return root


def published_copy(a: Path, b: Path, key, *artifacts: Path) -> Path:
    """B = a copy of A with `artifacts` published into it locally (what a publisher does before uploading)."""
    shutil.copytree(a, b, ignore=shutil.ignore_patterns(".*"))
    proc = publish(b, key, *artifacts)
    assert proc.returncode == 0, proc.stderr
    return b


def tar_bytes(members: list[tuple[str, bytes]], kinds: dict[str, bytes] | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 1_780_000_000, 0o644
            if kinds and name in kinds:
                info.type, info.size, info.linkname = kinds[name], 0, "/etc/passwd"
                tar.addfile(info)
            else:
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def upload_members(a: Path, b: Path) -> list[tuple[str, bytes]]:
    """Every file of B that A lacks or holds with other bytes, then B's index pair (what a publisher sends)."""
    members = []
    for path in sorted(p for p in b.rglob("*") if p.is_file()):
        rel = path.relative_to(b).as_posix()
        if rel in ("index.json", "index.json.asc") or any(part.startswith(".") for part in rel.split("/")):
            continue
        old = a / rel
        if not old.is_file() or old.read_bytes() != path.read_bytes():
            members.append((rel, path.read_bytes()))
    return members + [("index.json", (b / "index.json").read_bytes()),
                      ("index.json.asc", (b / "index.json.asc").read_bytes())]


def snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    """Every file of the served tree (dot-paths aside) with its bytes and mtime: "nothing changed" means equal."""
    return {p.relative_to(root).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()
            and not any(part.startswith(".") for part in p.relative_to(root).parts)}


def post(server: Server, body: bytes, token: str | None, **headers: str) -> requests.Response:
    h = {"Content-Type": "application/x-tar", **headers}
    if token is not None:
        h["Authorization"] = f"Bearer {token}"
    return requests.post(server.url("/api/v1/publish"), data=body, headers=h, timeout=120)


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """One repository with a published template, served read-only by one server for the download tests."""
    base = tmp_path_factory.mktemp("served")
    key = make_key(base)
    repo = init_repo(base / "repo", key)
    assert publish(repo, key, make_artifact(base / "out")).returncode == 0
    (base / "outside.txt").write_bytes(SECRET)
    (repo / "link-out").symlink_to(base / "outside.txt")
    (repo / "templates/link-dir").symlink_to(base)
    (repo / "templates/link-dot").symlink_to(repo / ".hidden")
    (repo / ".hidden").mkdir()
    (repo / ".hidden/file").write_bytes(SECRET)
    (repo / ".secret").write_bytes(SECRET)
    server = Server(repo, base / "logs", workers=2)
    (repo / ".lock").write_bytes(SECRET)  # after start-up, so the scan and sweep have run
    yield argparse.Namespace(repo=repo, key=key, server=server, base=base)
    server.stop()
    kill_agents(key[0])


@dataclass
class World:
    tmp: Path
    key: tuple[Path, str]
    a: Path  # the served repository (index version 2: one template)
    b: Path  # a local copy with one more template published (index version 3)
    token: str
    token_file: Path

    def body(self, b: Path | None = None) -> bytes:
        return tar_bytes(upload_members(self.a, b or self.b))

    def server(self, *args: str, token: bool = True, workers: int = 1) -> Server:
        extra = ("--token-file", str(self.token_file)) if token else ()
        return Server(self.a, self.tmp / "logs", *extra, *args, workers=workers)


@pytest.fixture
def world(tmp_path):
    key = make_key(tmp_path)
    a = init_repo(tmp_path / "a", key)
    assert publish(a, key, make_artifact(tmp_path / "v1")).returncode == 0
    b = published_copy(a, tmp_path / "b", key, make_artifact(tmp_path / "v2", version=V2, payload="new\n"))
    token = "tok-" + secrets.token_hex(16)
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)
    yield World(tmp_path, key, a, b, token, token_file)
    kill_agents(key[0])


@pytest.fixture
def running(world):
    servers: list[Server] = []

    def start(*args: str, **kw) -> Server:
        servers.append(world.server(*args, **kw))
        return servers[-1]

    yield start
    for s in servers:
        s.stop()


# ---------------------------------------------------------------------------------------------- downloads


def test_start_line_names_repo_address_and_upload_state(served):
    assert served.server.first_line == f"serving {served.repo} on {served.server.base}, uploads disabled"
    assert "uploads disabled: no token configured" in served.server.err.read_text()


def test_download_full_range_and_conditional(served):
    data = (served.repo / TARBALL).read_bytes()
    r = requests.get(served.server.url("/" + TARBALL), timeout=10)
    assert r.status_code == 200 and r.content == data
    assert r.headers["Content-Type"] == "application/zstd"
    assert int(r.headers["Content-Length"]) == len(data)
    etag, modified = r.headers["ETag"], r.headers["Last-Modified"]
    assert r.headers["Accept-Ranges"] == "bytes"

    part = requests.get(served.server.url("/" + TARBALL), headers={"Range": "bytes=10-41"}, timeout=10)
    assert part.status_code == 206 and part.content == data[10:42]
    assert part.headers["Content-Range"] == f"bytes 10-41/{len(data)}"
    assert int(part.headers["Content-Length"]) == 32
    tail = requests.get(served.server.url("/" + TARBALL), headers={"Range": "bytes=-7"}, timeout=10)
    assert tail.status_code == 206 and tail.content == data[-7:]
    bad = requests.get(served.server.url("/" + TARBALL), headers={"Range": f"bytes={len(data) + 5}-"}, timeout=10)
    assert bad.status_code == 416

    assert requests.get(served.server.url("/" + TARBALL), headers={"If-None-Match": etag},
                        timeout=10).status_code == 304
    r304 = requests.get(served.server.url("/" + TARBALL), headers={"If-Modified-Since": modified}, timeout=10)
    assert r304.status_code == 304 and r304.content == b""
    old = "Mon, 01 Jan 2001 00:00:00 GMT"
    assert requests.get(served.server.url("/" + TARBALL), headers={"If-Modified-Since": old},
                        timeout=10).status_code == 200
    head = requests.head(served.server.url("/" + TARBALL), timeout=10)
    assert head.status_code == 200 and int(head.headers["Content-Length"]) == len(data) and head.content == b""


@pytest.mark.parametrize("path, content_type", [
    ("/index.json", "application/json"),
    ("/index.json.asc", "text/plain"),
    (f"/templates/demo/{V1}/SHA256SUMS", "text/plain"),
    (f"/templates/demo/{V1}/SHA256SUMS.gpg", "application/pgp-signature"),
    (f"/templates/demo/{V1}/demo_{V1}_amd64.manifest.json", "application/json"),
    (f"/templates/demo/{V1}/demo_{V1}_amd64.tar.zst.asc", "text/plain"),
])
def test_content_types_and_exact_bytes(served, path, content_type):
    r = requests.get(served.server.url(path), timeout=10)
    assert r.status_code == 200
    assert r.headers["Content-Type"].split(";")[0] == content_type
    assert r.content == (served.repo / path.lstrip("/")).read_bytes()
    assert int(r.headers["Content-Length"]) == len(r.content)


def test_html_page_lists_the_template_with_links(served):
    from repo_server.app import human_size

    r = requests.get(served.server.url("/"), timeout=10)
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/html")
    page = r.text
    entry = index_of(served.repo)["templates"][0]
    for text in ("test-repo", "index version", f"<dd>{index_of(served.repo)['version']}</dd>", "demo", V1, "amd64",
                 entry["sha256"], entry["created"], human_size(entry["size"]),
                 f'href="{served.server.base}/{TARBALL}"', f'href="{served.server.base}/{TARBALL}.asc"',
                 f'href="{served.server.base}/{entry["manifest"]["path"]}"',
                 f"tmplbuild remote add test-repo {served.server.base} ", "gpgv --keyring", "sha256sum -c",
                 served.key[1]):
        assert text in page, text
    # every link on the page works
    for href in set(re.findall(r'href="([^"]+)"', page)):
        assert requests.get(href, timeout=10).status_code == 200, href


class _Pre(html.parser.HTMLParser):
    """The text of each <pre> on a page, as a reader copies it (tags such as <var> dropped, entities decoded)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.blocks: list[str] = []
        self._inside = False

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag == "pre":
            self._inside = True
            self.blocks.append("")

    def handle_endtag(self, tag: str) -> None:
        if tag == "pre":
            self._inside = False

    def handle_data(self, data: str) -> None:
        if self._inside:
            self.blocks[-1] += data


def run_page_command(command: str, home: Path, dest: Path, *fetch_args: str) -> str:
    """One `tmplbuild ...` line the page shows, run as a node admin whose home is `home` (its own config and
    state); fetch installs into `dest` (not the real /var/lib/vz/template/cache), with `fetch_args`. Its stdout."""
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower() and k not in
           ("GNUPGHOME", "TMPLBUILD_CONFIG_DIR", "XDG_CONFIG_HOME", "XDG_STATE_HOME")}
    env.update(HOME=str(home), TMPLBUILD_STATE_DIR=str(home / "state"),
               TMPLBUILD_SYSTEM_CONFIG_DIR=str(home / "etc"), NO_PROXY="*")
    argv = shlex.split(command)
    assert argv[0] == "tmplbuild"
    extra = ["--dest", str(dest), *fetch_args] if argv[1] == "fetch" else []
    proc = subprocess.run([sys.executable, "-m", "tmplbuild", *argv[1:], *extra], cwd=home, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, (command, proc.stderr)
    return proc.stdout


def test_the_commands_on_the_page_fetch_the_template(tmp_path):
    """A node admin copies the page's tmplbuild commands, puts in the key file and fingerprint they got out of
    band (here: the key the page links, checked against the fingerprint the test knows), and runs them."""
    from tmplbuild.run import host_arch

    key = make_key(tmp_path)
    fpr = key[1]
    repo = init_repo(tmp_path / "repo", key)
    # The page's fetch takes the host's architecture, as a node admin's would.
    ssl = Package("libssl3", "3.0.15-1~deb12u1", host_arch(), source="openssl")
    assert publish(repo, key, make_artifact(tmp_path / "out", arch=host_arch(), packages=(ssl,))).returncode == 0
    tarball = next(repo.glob("templates/demo/*/*.tar.zst"))
    server = Server(repo, tmp_path / "logs")
    try:
        page = requests.get(server.url("/"), timeout=10).text
        assert "out of band" in page and "--remote http" not in page
        assert f'href="{server.base}/keys/{fpr}.asc"' in page
        key_file = tmp_path / "downloaded.asc"
        key_file.write_bytes(requests.get(server.url(f"/keys/{fpr}.asc"), timeout=10).content)

        parser = _Pre()
        parser.feed(page)
        shown = [line for block in parser.blocks for line in block.splitlines() if line.startswith("tmplbuild ")]
        assert [shlex.split(c)[1] for c in shown] == ["remote", "list", "fetch", "fetch", "sbom", "show",
                                                      "affected"], shown
        commands = [c.replace("KEY.asc", str(key_file)).replace("FINGERPRINT", fpr)
                    .replace("VERSION", "3.0.11-1") for c in shown]

        # remote add, list, fetch --remote, then sbom, show and affected with that remote; a one-off fetch
        for n, group in enumerate((commands[:3] + commands[4:], commands[3:4])):
            home, dest = tmp_path / f"admin{n}", tmp_path / f"cache{n}"
            home.mkdir()
            dest.mkdir()
            for command in group:
                out = run_page_command(command, home, dest)
                if shlex.split(command)[1] == "list":
                    assert re.search(rf"^demo\s+{V1}\s+{host_arch()}\s", out, re.M), out
                if shlex.split(command)[1] == "show":
                    assert re.search(r"^  libssl3\s+3.0.15-1~deb12u1\s+openssl\s", out, re.M), out
            if n == 0:
                assert json.loads((home / "sbom.cdx.json").read_bytes())["components"][0]["name"] == "libssl3"
            assert [p.name for p in dest.iterdir()] == [tarball.name]
            assert (dest / tarball.name).read_bytes() == tarball.read_bytes()
    finally:
        server.stop()
        kill_agents(key[0])


class _Groups(html.parser.HTMLParser):
    """The templates table as a reader sees it: per <tbody class="template">, its name, version, the
    architectures of its rows and the SHA256SUMS links inside it."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.groups: list[dict] = []
        self._cell: str | None = None

    def handle_starttag(self, tag: str, attrs: list) -> None:
        a = dict(attrs)
        if tag == "tbody" and a.get("class") == "template":
            self.groups.append({"name": a["data-name"], "version": a["data-version"], "arches": [], "sums": []})
        elif self.groups and tag == "td" and a.get("class") == "arch":
            self._cell = ""
        elif self.groups and tag == "a" and a.get("href", "").endswith("/SHA256SUMS"):
            self.groups[-1]["sums"].append(a["href"])

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._cell is not None:
            self.groups[-1]["arches"].append(self._cell.strip())
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell += data


def test_the_architectures_of_one_version_are_grouped_and_fetched_by_arch(tmp_path):
    """amd64, arm64 and armhf of one version share its directory: the page shows them as one group with one
    SHA256SUMS; fetch takes the host's, --arch another, lists what there is for an architecture the index lacks,
    and keeps a template this host cannot run out of its own template cache unless --dest names another."""
    key = make_key(tmp_path)
    repo = init_repo(tmp_path / "repo", key)
    arches = ("amd64", "arm64", "armhf")
    made = [make_artifact(tmp_path / f"out-{a}", arch=a, payload=f"{a}\n") for a in arches]
    made.append(make_artifact(tmp_path / "out-v2", version=V2, payload="v2\n"))
    assert publish(repo, key, *made).returncode == 0
    sums = (repo / f"templates/demo/{V1}/SHA256SUMS").read_text()
    assert all(f"demo_{V1}_{a}.tar.zst" in sums for a in arches)
    server = Server(repo, tmp_path / "logs")
    try:
        page = requests.get(server.url("/"), timeout=10).text
        parser = _Groups()
        parser.feed(page)
        assert [(g["name"], g["version"], g["arches"]) for g in parser.groups] == [
            ("demo", V1, list(arches)), ("demo", V2, ["amd64"])]
        assert [g["sums"] for g in parser.groups] == [[f"{server.base}/templates/demo/{v}/SHA256SUMS"] for v in (V1, V2)]
        assert "3 architectures: amd64, arm64, armhf" in page
        for href in set(re.findall(r'href="([^"]+)"', page)):
            assert requests.get(href, timeout=10).status_code == 200, href

        home = tmp_path / "admin"
        home.mkdir()
        binfmt = tmp_path / "binfmt"  # a host with binfmt_misc mounted and no qemu entry at all
        binfmt.mkdir()
        (binfmt / "status").write_text("enabled\n")
        env = {"HOME": str(home), "TMPLBUILD_STATE_DIR": str(home / "state"),
               "TMPLBUILD_SYSTEM_CONFIG_DIR": str(home / "etc"), "NO_PROXY": "*", "TMPLBUILD_BINFMT_DIR": str(binfmt)}
        pin = ("--url", server.base, "--key", str(tmp_path / "pub.asc"), "--fingerprint", key[1])

        def fetch(*args: str) -> subprocess.CompletedProcess[str]:
            return tmplbuild("fetch", "demo", *pin, *args, env=env)

        got = fetch("--arch", "arm64", "--version", V1, "--dest", str(tmp_path / "mirror"))
        assert got.returncode == 0, got.stderr
        assert [p.name for p in (tmp_path / "mirror").iterdir()] == [f"demo_{V1}_arm64.tar.zst"]
        assert (tmp_path / f"mirror/demo_{V1}_arm64.tar.zst").read_bytes() == \
            (repo / f"templates/demo/{V1}/demo_{V1}_arm64.tar.zst").read_bytes()

        missing = fetch("--arch", "riscv64", "--version", V1, "--dest", str(tmp_path / "mirror"))
        assert missing.returncode == 2
        assert f"its architectures in {V1}: amd64, arm64, armhf; give --arch" in missing.stderr

        # No --dest: this node's template cache. This host cannot run arm64 here (no binfmt entry): refused by
        # name before anything is asked of the server.
        env["TMPLBUILD_STATE_DIR"] = str(tmp_path / "fresh-state")
        refused = fetch("--arch", "arm64")
        assert refused.returncode == 2, refused.stderr
        assert "qemu-aarch64" in refused.stderr and "--dest DIR" in refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1
        assert not (tmp_path / "fresh-state").exists()
    finally:
        server.stop()
        kill_agents(key[0])


def test_json_api_matches_the_signed_index_and_healthz(served):
    doc = index_of(served.repo)
    api = requests.get(served.server.url("/api/v1/templates"), timeout=10)
    assert api.status_code == 200 and api.headers["Content-Type"] == "application/json"
    assert api.json() == {k: doc[k] for k in ("repo_id", "version", "generated", "expires", "templates")}
    health = requests.get(served.server.url("/healthz"), timeout=10)
    assert health.status_code == 200 and health.json() == {"status": "ok", "index_version": doc["version"]}


@pytest.mark.parametrize("target", [
    b"/../outside.txt", b"/templates/../../outside.txt", b"/templates/demo/../../../outside.txt",
    b"/%2e%2e/outside.txt", b"/%2E%2E/outside.txt", b"/templates/%2e%2e/%2e%2e/outside.txt",
    b"/..%2foutside.txt", b"/templates/..%2F..%2Foutside.txt", b"/%2e%2e%2foutside.txt",
    b"/..\\outside.txt", b"/templates\\..\\..\\outside.txt", b"/%5c..%5coutside.txt", b"/templates/..%5c..%5coutside.txt",
    b"/index.json%00", b"/%00/../outside.txt", b"/templates/%00",
    b"//etc/passwd", b"/%2fetc/passwd", b"///outside.txt",
    b"/link-out", b"/templates/link-dir/outside.txt", b"/templates/link-dot/file",
    b"/.lock", b"/.secret", b"/.hidden/file", b"/%2esecret", b"/templates/../.secret", b"/./index.json",
    b"/keys/../.secret",
])
def test_path_traversal_dotfiles_and_escaping_symlinks_are_404(served, target):
    status, raw = raw_get(served.server.port, target)
    assert status == 404, (target, raw[:200])
    assert SECRET not in raw and b"root:" not in raw


@pytest.mark.parametrize("target", [b"/index.json\x00", b"/..\x00/outside.txt"])
def test_raw_nul_in_the_request_line_never_reaches_a_file(served, target):
    status, raw = raw_get(served.server.port, target)
    assert status in (400, 404) and SECRET not in raw and b'"repo_id"' not in raw


def test_directories_and_missing_files_are_404_and_wrong_methods_405(served):
    for path in ("/templates", "/templates/", "/templates/demo", "/keys/", "/nope.json"):
        assert requests.get(served.server.url(path), timeout=10).status_code == 404, path
    assert requests.post(served.server.url("/index.json"), timeout=10).status_code == 405


# ---------------------------------------------------------------------------------------------- uploads


def test_upload_publishes_and_the_result_verifies(world, running):
    server = running()
    assert server.uploads == "enabled"
    sent = [rel for rel, _ in upload_members(world.a, world.b) if not rel.startswith("index.json")]
    # The new version's template, its delta from V1, manifest, their .asc, SHA256SUMS and its .gpg.
    assert len(sent) == 8 and any(rel.endswith(f".from-{V1}.tar.zst.delta") for rel in sent)
    r = post(server, world.body(), world.token)
    assert r.status_code == 200, r.text
    new = f"templates/demo/{V2}/demo_{V2}_amd64.tar.zst"
    assert r.json()["version"] == 3
    assert sorted(r.json()["added"]) == sorted(sent)
    assert (world.a / "index.json").read_bytes() == (world.b / "index.json").read_bytes()
    got = requests.get(server.url("/" + new), timeout=10)
    assert got.status_code == 200 and got.content == (world.b / new).read_bytes()
    assert requests.get(server.url("/healthz"), timeout=10).json()["index_version"] == 3
    api = requests.get(server.url("/api/v1/templates"), timeout=10).json()
    assert [t["version"] for t in api["templates"]] == [V1, V2]
    assert V2 in requests.get(server.url("/"), timeout=10).text
    proc = tmplbuild("repo", "verify", str(world.a))
    assert proc.returncode == 0, proc.stderr
    assert not list(world.a.glob(".upload-*"))
    assert world.token not in server.err.read_text()


def test_upload_without_token_with_wrong_token_and_when_disabled(world, running):
    server = running()
    before = snapshot(world.a)
    body = world.body()
    for token in (None, "wrong-" + secrets.token_hex(16), world.token + "x", ""):
        r = post(server, body, token)
        assert r.status_code == 401 and "token" in r.json()["error"], token
    r = requests.post(server.url("/api/v1/publish"), data=body, timeout=30,
                      headers={"Content-Type": "application/x-tar", "Authorization": f"Basic {world.token}"})
    assert r.status_code == 401
    disabled = running(token=False)
    r = post(disabled, body, world.token)
    assert r.status_code == 403 and r.json() == {"error": "uploads are disabled on this server"}
    assert snapshot(world.a) == before
    assert world.token not in server.err.read_text()


def test_upload_with_a_tampered_file_is_refused_and_nothing_changes(world, running):
    server = running()
    before = snapshot(world.a)
    members = upload_members(world.a, world.b)
    new = f"templates/demo/{V2}/demo_{V2}_amd64.tar.zst"
    members = [(rel, data[:-1] + bytes([data[-1] ^ 1]) if rel == new else data) for rel, data in members]
    r = post(server, tar_bytes(members), world.token)
    assert r.status_code == 422 and new in r.json()["error"] and "sha256" in r.json()["error"]
    assert snapshot(world.a) == before
    assert not list(world.a.glob(".upload-*"))
    # a missing per-file signature, and an unlisted extra file, are refused the same way
    no_asc = [(rel, data) for rel, data in upload_members(world.a, world.b) if rel != new + ".asc"]
    r = post(server, tar_bytes(no_asc), world.token)
    assert r.status_code == 422 and ".asc" in r.json()["error"]
    extra = upload_members(world.a, world.b) + [(f"templates/demo/{V2}/extra.tar.zst", b"x")]
    r = post(server, tar_bytes(extra), world.token)
    assert r.status_code == 422 and "not listed" in r.json()["error"]
    sums = f"templates/demo/{V2}/SHA256SUMS"
    bad_sums = [(rel, data.replace(b"  demo", b"  demx") if rel == sums else data)
                for rel, data in upload_members(world.a, world.b)]
    r = post(server, tar_bytes(bad_sums), world.token)
    assert r.status_code == 422 and "SHA256SUMS.gpg" in r.json()["error"]
    # signed by the right key, but not what the signed index says
    text = dict(bad_sums)[sums]
    signed = [(rel, text if rel == sums else
               gpg(world.key[0], "--detach-sign", "--local-user", world.key[1], input=text).stdout
               if rel == sums + ".gpg" else data) for rel, data in upload_members(world.a, world.b)]
    r = post(server, tar_bytes(signed), world.token)
    assert r.status_code == 422 and "SHA256SUMS: does not match the new index" in r.json()["error"]
    assert snapshot(world.a) == before


def test_upload_carrying_a_private_key_is_refused(world, running, tmp_path):
    server = running()
    before = snapshot(world.a)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "k")], check=True)
    members = upload_members(world.a, world.b) + [(f"templates/demo/{V2}/id_ed25519", (tmp_path / "k").read_bytes())]
    r = post(server, tar_bytes(members), world.token)
    assert r.status_code == 422 and "private key" in r.json()["error"]
    assert snapshot(world.a) == before and not list(world.a.glob(".upload-*"))


def test_upload_signed_by_another_key_is_refused(world, running):
    server = running()
    before = snapshot(world.a)
    home, _ = other_key(world.tmp, "intruder")
    members = upload_members(world.a, world.b)
    index = dict(members)["index.json"]
    forged = gpg(home, "--armor", "--detach-sign", input=index).stdout
    members = [(rel, forged if rel == "index.json.asc" else data) for rel, data in members]
    r = post(server, tar_bytes(members), world.token)
    assert r.status_code == 422 and "not pinned" in r.json()["error"]
    # a stolen token plus a self-made index with the right version: still nothing a client would accept
    doc = json.loads(index)
    doc["templates"][0]["description"] = "evil"
    data = (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()
    members = [(rel, data if rel == "index.json" else d) for rel, d in members]
    members = [(rel, gpg(home, "--armor", "--detach-sign", input=data).stdout if rel == "index.json.asc" else d)
               for rel, d in members]
    assert post(server, tar_bytes(members), world.token).status_code == 422
    assert snapshot(world.a) == before
    kill_agents(home)


def test_upload_of_an_index_a_client_would_refuse_is_422(world, running):
    """Signed by the right key, but another repository's id, or already expired."""
    server = running()
    before = snapshot(world.a)
    home, fpr = world.key
    members = upload_members(world.a, world.b)
    doc = json.loads(dict(members)["index.json"])
    doc["repo_id"] = "other-repo"
    data = (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()
    sig = gpg(home, "--armor", "--detach-sign", "--local-user", fpr, input=data).stdout
    swapped = [(rel, data if rel == "index.json" else sig if rel == "index.json.asc" else d) for rel, d in members]
    r = post(server, tar_bytes(swapped), world.token)
    assert r.status_code == 422 and "repo_id 'other-repo', expected 'test-repo'" in r.json()["error"]

    short = world.tmp / "short"
    shutil.copytree(world.a, short, ignore=shutil.ignore_patterns(".*"))
    proc = tmplbuild("publish", "--skip-test", str(make_artifact(world.tmp / "v5", version=V2, payload="x\n")), "--repo", str(short),
                     "--key", fpr, "--gnupghome", str(home), "--expires-in", "1s")
    assert proc.returncode == 0, proc.stderr
    time.sleep(1.5)
    r = post(server, world.body(short), world.token)
    assert r.status_code == 422 and "expired" in r.json()["error"]
    assert snapshot(world.a) == before


def test_same_upload_twice_is_409_with_the_current_version(world, running):
    server = running()
    body = world.body()
    assert post(server, body, world.token).status_code == 200
    after = snapshot(world.a)
    r = post(server, body, world.token)
    assert r.status_code == 409 and r.json()["current_version"] == 3 and "version 3" in r.json()["error"]
    assert snapshot(world.a) == after


@pytest.mark.parametrize("name, kind", [
    ("../evil", None), ("/etc/evil", None), ("templates/demo/../../../evil", None), (".hidden", None),
    ("templates/demo/v/.sneaky", None), ("keys/AAAA.asc", None), ("templates/x", None),
    ("templates/demo/v/link", tarfile.SYMTYPE), ("templates/demo/v/hard", tarfile.LNKTYPE),
    ("templates/demo/v", tarfile.DIRTYPE), ("templates/demo/v/fifo", tarfile.FIFOTYPE),
])
def test_upload_with_unsafe_tar_members_is_400(world, running, name, kind):
    server = running()
    before = snapshot(world.a)
    members = [(name, b"payload")] + upload_members(world.a, world.b)
    r = post(server, tar_bytes(members, {name: kind} if kind else None), world.token)
    assert r.status_code == 400, r.text
    assert snapshot(world.a) == before
    assert not (world.tmp / "evil").exists() and not list(world.a.glob(".upload-*"))


def test_upload_malformed_requests(world, running):
    server = running()
    r = post(server, b"not a tar at all" * 100, world.token)
    assert r.status_code == 400
    r = post(server, world.body(), world.token, **{"Content-Type": "application/gzip"})
    assert r.status_code == 415
    chunked = requests.post(server.url("/api/v1/publish"), data=iter([world.body()]), timeout=30,
                            headers={"Content-Type": "application/x-tar", "Authorization": f"Bearer {world.token}"})
    assert chunked.status_code == 411
    only_files = [(rel, d) for rel, d in upload_members(world.a, world.b) if not rel.startswith("index.json")]
    r = post(server, tar_bytes(only_files), world.token)
    assert r.status_code == 400 and "index.json" in r.json()["error"]


def test_oversized_upload_is_413(world, running):
    server = running("--max-upload", "4096")
    body = world.body()
    assert len(body) > 4096
    r = post(server, body, world.token)
    assert r.status_code == 413 and "4096" in r.json()["error"]
    # a Content-Length that lies low: the server reads no more than it announced, and the tar is cut short
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        s.sendall(b"POST /api/v1/publish HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-tar\r\n"
                  b"Authorization: Bearer " + world.token.encode() + b"\r\nContent-Length: 2048\r\n"
                  b"Connection: close\r\n\r\n" + body)
        reply = b""
        try:
            while chunk := s.recv(65536):
                reply += chunk
        except ConnectionResetError:  # the unread rest of the body makes the close a reset
            pass
    assert reply.startswith(b"HTTP/1.1 400") and b"truncated" in reply
    assert not list(world.a.glob(".upload-*"))


def test_two_concurrent_uploads_exactly_one_wins(world, running):
    server = running(workers=2)
    b2 = published_copy(world.a, world.tmp / "b2", world.key,
                        make_artifact(world.tmp / "v3", name="other", payload="other\n"))
    bodies = [world.body(world.b), world.body(b2)]
    barrier = threading.Barrier(2)
    results: list[requests.Response] = [None, None]  # type: ignore[list-item]

    def send(i: int) -> None:
        barrier.wait()
        results[i] = post(server, bodies[i], world.token)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r.status_code for r in results) == [200, 409], [r.text for r in results]
    winner = results[0] if results[0].status_code == 200 else results[1]
    loser = results[1] if winner is results[0] else results[0]
    assert loser.json()["current_version"] == 3
    assert index_of(world.a)["version"] == 3
    assert tmplbuild("repo", "verify", str(world.a)).returncode == 0


def test_server_killed_mid_upload_leaves_the_index_intact_and_the_leftover_is_swept(world, running):
    server = running()
    before = snapshot(world.a)
    # a template of a few hundred KB, so that half the body holds whole tar members the server writes out
    big = published_copy(world.a, world.tmp / "big", world.key,
                         make_artifact(world.tmp / "vbig", version=V2, payload=secrets.token_hex(400_000)))
    body = world.body(big)
    assert len(body) > 256 << 10
    new = f"templates/demo/{V2}/demo_{V2}_amd64.tar.zst"
    s = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    s.sendall(b"POST /api/v1/publish HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-tar\r\n"
              b"Authorization: Bearer " + world.token.encode() + b"\r\n"
              b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n")
    half = len(body) // 2
    for i in range(0, half, 8192):  # slowly, so the server is mid-stream
        s.sendall(body[i:min(i + 8192, half)])
        time.sleep(0.01)
    deadline = time.monotonic() + 10
    while not list(world.a.glob(".upload-*/templates")) and time.monotonic() < deadline:
        time.sleep(0.05)
    leftovers = list(world.a.glob(".upload-*"))
    assert leftovers and list(world.a.glob(".upload-*/templates/demo/*/*")), "the upload never started"
    server.kill()
    s.close()
    assert snapshot(world.a) == before
    assert list(world.a.glob(".upload-*")) == leftovers  # nothing cleaned up: it really died
    assert not (world.a / new).exists()
    assert tmplbuild("repo", "verify", str(world.a)).returncode == 0

    again = running()
    assert not list(world.a.glob(".upload-*"))
    assert "interrupted upload" in again.err.read_text()
    assert requests.get(again.url("/healthz"), timeout=10).json()["index_version"] == 2
    assert post(again, body, world.token).status_code == 200  # the retry completes the job
    assert tmplbuild("repo", "verify", str(world.a)).returncode == 0


# ---------------------------------------------------------------------------------------------- start-up


def run_serve(repo: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """A server start that is expected to fail at once."""
    return subprocess.run(serve_argv(str(repo), "--host", "127.0.0.1", "--port", "0", *args), cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def test_refuses_to_start_over_private_key_material(world):
    (world.a / "templates/id_ed25519").unlink(missing_ok=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(world.a / "templates/id_ed25519")],
                   check=True)
    proc = run_serve(world.a)
    assert proc.returncode == 6, proc.stderr
    assert proc.stderr.count("\n") == 1 and "/templates/id_ed25519" in proc.stderr
    assert "private key" in proc.stderr and "serving" not in proc.stdout
    (world.a / "templates/id_ed25519").unlink()
    (world.a / "templates/id_ed25519.pub").unlink()

    (world.a / ".gnupg/private-keys-v1.d").mkdir(parents=True)  # a GnuPG home, even an empty one
    proc = run_serve(world.a)
    assert proc.returncode == 6 and "private-keys-v1.d" in proc.stderr, proc.stderr
    shutil.rmtree(world.a / ".gnupg")

    shutil.copytree(world.key[0], world.a / "keys/home", ignore=shutil.ignore_patterns("S.*"))  # the real key
    with pytest.raises(UnsafeContentError):
        from repo_server import create_app
        create_app({"REPO": str(world.a)})


def test_start_up_errors_are_one_line_with_their_exit_codes(world, tmp_path):
    proc = run_serve(tmp_path / "nope")
    assert proc.returncode == 2 and proc.stderr.startswith("tmplbuild: ") and proc.stderr.count("\n") == 1
    short = tmp_path / "short-token"
    short.write_text("abc\n")
    proc = run_serve(world.a, "--token-file", str(short))
    assert proc.returncode == 2 and "token" in proc.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        proc = subprocess.run(serve_argv(str(world.a), "--host", "127.0.0.1", "--port", str(busy.getsockname()[1])),
                              cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 7 and "in use" in proc.stderr, proc.stderr


# ---------------------------------------------------------------------------------------------- in-process


def test_config_from_mapping_then_environment(world, monkeypatch):
    from repo_server import create_app

    app = create_app({"REPO": str(world.a), "TOKEN": world.token, "MAX_UPLOAD": 1000})
    assert app.extensions["tmplbuild"].max_upload == 1000
    assert app.extensions["tmplbuild"].token == world.token.encode()
    monkeypatch.setenv("TMPLBUILD_SERVER_MAX_UPLOAD", "5000")
    monkeypatch.setenv("TMPLBUILD_SERVER_TOKEN_FILE", str(world.token_file))
    app = create_app({"REPO": str(world.a), "MAX_UPLOAD": 1000})
    assert app.extensions["tmplbuild"].max_upload == 5000
    assert app.extensions["tmplbuild"].token == world.token.encode()
    monkeypatch.setenv("TMPLBUILD_SERVER_REPO", str(world.b))
    assert create_app().extensions["tmplbuild"].root == world.b
    monkeypatch.delenv("TMPLBUILD_SERVER_REPO")
    with pytest.raises(UsageError):
        create_app()
    monkeypatch.delenv("TMPLBUILD_SERVER_MAX_UPLOAD")
    with pytest.raises(UsageError):
        create_app({"REPO": str(world.a), "MAX_UPLOAD": "lots"})


def test_an_index_that_does_not_verify_is_never_shown(world):
    from repo_server import create_app

    app = create_app({"REPO": str(world.a)})
    client = app.test_client()
    assert client.get("/api/v1/templates").status_code == 200
    data = (world.a / "index.json").read_bytes()
    (world.a / "index.json").write_bytes(data.replace(b'"description": "demo template"',
                                                      b'"description": "evil template"'))
    for path in ("/", "/api/v1/templates", "/healthz"):
        r = client.get(path)
        assert r.status_code == 503, path
        assert b"evil" not in r.data and b"does not verify" in r.data
        assert r.data.strip().count(b"\n") == 0
    # the raw file is still served as is (clients check it themselves) ...
    assert client.get("/index.json").data.count(b"evil") == 1
    # ... and once the index verifies again, so does the page
    (world.a / "index.json").write_bytes(data)
    assert client.get("/healthz").json == {"status": "ok", "index_version": 2}


def test_verified_index_is_cached_and_follows_a_local_publish(world, monkeypatch):
    from repo_server import create_app, verified

    app = create_app({"REPO": str(world.a)})
    client = app.test_client()
    calls = []
    real = verified.verify_pair
    monkeypatch.setattr(verified, "verify_pair", lambda *a: calls.append(1) or real(*a))
    for _ in range(5):
        assert client.get("/healthz").json["index_version"] == 2
    assert calls == []  # verified once at start-up, cached since
    assert publish(world.a, world.key, make_artifact(world.tmp / "v9", version="12-20261209",
                                                     payload="9\n")).returncode == 0
    for _ in range(3):
        assert client.get("/healthz").json["index_version"] == 3
    assert calls == [1]


def test_upload_dir_in_use_is_not_swept(world):
    from repo_server import safety

    busy, stale = world.a / ".upload-busy", world.a / ".upload-stale"
    busy.mkdir()
    stale.mkdir()
    (stale / "index.json").write_bytes(b"{}")
    fd = safety.lock_dir(busy)
    try:
        assert safety.sweep_uploads(world.a) == [".upload-stale"]
        assert busy.is_dir() and not stale.exists()
    finally:
        os.close(fd)
    assert safety.sweep_uploads(world.a) == [".upload-busy"]


def test_resolve_download_rules(served):
    from repo_server.safety import resolve_download

    root = os.path.realpath(served.repo)
    assert resolve_download(root, "index.json") == "index.json"
    assert resolve_download(root, TARBALL) == TARBALL
    for bad in ("", "..", "../outside.txt", "a/../index.json", "./index.json", "/index.json", "index.json/",
                "a\\b", "index.json\0", ".lock", "templates/.x", "link-out", "templates/link-dir/outside.txt",
                "templates/link-dot/file", "templates", "keys", "private-keys-v1.d/x", "secring.gpg"):
        assert resolve_download(root, bad) is None, bad


def test_index_pair_mid_swap_is_retried_not_cached_as_broken(world):
    """A reader between the publisher's two renames sees a new signature over the old index: the cache reads
    again instead of answering 503 from then on."""
    from repo_server.verified import IndexCache

    cache = IndexCache(world.a)
    assert cache.get().index.version == 2
    old_sig = (world.a / "index.json.asc").read_bytes()
    (world.a / "index.json.asc").write_bytes((world.b / "index.json.asc").read_bytes())
    with pytest.raises(Exception):
        cache.get()
    (world.a / "index.json").write_bytes((world.b / "index.json").read_bytes())
    assert cache.get().index.version == 3
    assert old_sig != (world.a / "index.json.asc").read_bytes()


def test_gunicorn_settings_keep_sendfile_on_and_use_threads(world):
    """gunicorn turns sendfile *off* whenever its `sendfile` setting is given at all: downloads must go out
    with sendfile(2), not 8 KiB writes from Python."""
    from repo_server import create_app
    from tmplbuild.serve import _Gunicorn, gunicorn_options

    cfg = _Gunicorn(create_app({"REPO": str(world.a)}), gunicorn_options(world.a, 2, 99)).cfg
    assert cfg.sendfile is True or "SENDFILE" in os.environ
    assert (cfg.worker_class_str, cfg.workers, cfg.threads) == ("gthread", 2, 16)
    assert cfg.address == [99] and cfg.accesslog is None
