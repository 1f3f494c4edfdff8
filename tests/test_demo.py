"""`make demo` (contrib/demo.sh) run the way make runs it, with a real debootstrap build: it keeps the root key
apart from the online key and shows a client following a rotation; it leaves no process behind (no gunicorn
master or worker, no gpg-agent of its throwaway keys), whether it succeeds or is stopped
with Ctrl-C, and it ends by saying where its files are and how to remove them; the command it prints works."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from tests.conftest import ROOT, can_build

pytestmark = [pytest.mark.build, pytest.mark.skipif(can_build() is not None, reason=str(can_build()))]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """One package cache for both runs: the second build is a warm one."""
    return tmp_path_factory.mktemp("demo-cache")


def demo_env(tmp: Path, cache: Path) -> dict[str, str]:
    """`PYTHON=.venv/bin/python sh contrib/demo.sh`, as `make demo` runs it, but with OUT, the package cache and
    any client config and state under `tmp` (the demo's own files go into a mktemp directory in /tmp)."""
    for d in ("home", "etc", "state"):
        (tmp / d).mkdir()
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower() and k != "GNUPGHOME"}
    env.update(PYTHON=sys.executable, OUT=str(tmp / "out"), TMPLBUILD_CACHE_DIR=str(cache), HOME=str(tmp / "home"),
               TMPLBUILD_SYSTEM_CONFIG_DIR=str(tmp / "etc"), TMPLBUILD_STATE_DIR=str(tmp / "state"), NO_PROXY="*")
    return env


def work_dir(output: str) -> Path | None:
    """The demo's mktemp directory, which its output names (step 2 on, and the closing lines)."""
    m = re.search(r"(/tmp/tmplbuild-demo\.\w+)", output)
    return Path(m.group(1)) if m else None


@pytest.fixture
def outputs():
    """The demo's output, appended by each test; its mktemp directory is removed afterwards, whatever happened."""
    seen: list[str] = []
    yield seen
    for output in seen:
        if work := work_dir(output):
            shutil.rmtree(work, ignore_errors=True)


def processes_of(*marks: Path) -> dict[int, str]:
    """Every live process whose command line or environment names one of `marks`: what the demo started. Its
    processes inherit the environment this test gives it (naming the test's tmp_path), except those tmplbuild
    starts with a minimal environment (gpg, and the gpg-agent gpg spawns), whose command line names the demo's
    mktemp directory."""
    wanted = [str(m).encode() for m in marks]
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue  # already dead, waiting for init to reap it
            cmdline, environ = (entry / "cmdline").read_bytes(), (entry / "environ").read_bytes()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        if any(m in cmdline or m in environ for m in wanted):
            found[int(entry.name)] = cmdline.replace(b"\0", b" ").decode(errors="replace")
    return found


def assert_nothing_left(tmp: Path, output: str) -> None:
    marks = [tmp, *filter(None, [work_dir(output)])]
    deadline = time.monotonic() + 2  # a daemon told to exit may take a moment to go
    while (left := processes_of(*marks)) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in left:  # never leave them running, even when the test fails
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert left == {}, f"the demo left processes running: {left}"


def failure_excerpt(output: str) -> str:
    """What a failed demo said: its FAIL lines (a boot check's evidence comes early in a long output), then its
    last lines."""
    fails = [line for line in output.splitlines() if "FAIL " in line]
    return "\n".join(fails) + "\n...\n" + output[-3000:]


def server_url(output: str) -> str:
    m = re.search(r"^serving \S+ on (http://127\.0\.0\.1:\d+), uploads disabled$", output, re.M)
    assert m, output
    return m.group(1)


def assert_stopped(url: str) -> None:
    with pytest.raises(requests.ConnectionError):
        requests.get(url + "/healthz", timeout=5)


def test_the_demo_succeeds_leaves_no_process_and_says_how_to_remove_its_files(tmp_path, cache, outputs):
    proc = subprocess.run(["sh", "contrib/demo.sh"], cwd=ROOT, env=demo_env(tmp_path, cache), capture_output=True,
                          text=True, timeout=1800)
    outputs.append(proc.stdout)
    assert_nothing_left(tmp_path, proc.stdout)
    assert proc.returncode == 0, failure_excerpt(proc.stdout) + proc.stderr[-3000:]
    assert_stopped(server_url(proc.stdout))

    work = work_dir(proc.stdout)
    assert work is not None and work.is_dir(), proc.stdout[-3000:]
    fetched = list(work.glob("cache/debian-12-minimal_*_amd64.tar.zst"))
    built = list((tmp_path / "out").glob("debian-12-minimal_*_amd64.*"))
    assert len(fetched) == 1
    # the root key is kept apart from CI's: its own GNUPGHOME, checked to hold no secret root key; the client pins
    # only the root key; after root 2 drops CI's key the client refuses the index it signed, until re-signed
    for line in ("checked: CI's GNUPGHOME holds no secret root key", "published root 1 of tmplbuild-demo",
                 "published root 2 of tmplbuild-demo", "(exit 3, as it must be)"):
        assert line in proc.stdout, line
    assert "root:" in proc.stdout.split("### 11.")[1]  # `remote list`: the remote pins a root key, no index key
    assert sorted(p.name.split("_amd64")[1] for p in built) == [".cdx.json", ".intoto.json", ".lxc-meta.tar.xz",
                                                                 ".manifest.json", ".oci.tar", ".spdx.json",
                                                                 ".tar.xz", ".tar.zst"]
    # The image went to a registry on 127.0.0.1 signed by CI's key; stock skopeo verified it under the policy
    # `tmplbuild oci trust` wrote and refused it under a tag nobody signed; tmplbuild's own client pulled it by the
    # digest the signed index binds.
    oci = proc.stdout.split("### 9.")[1].split("### 10.")[0]
    made_of = proc.stdout.split("### 10.")[1].split("### 11.")[0]
    assert re.search(r"sbom\.cdx\.json: cyclonedx of debian-12-minimal .* sha256 [0-9a-f]{64}", made_of), made_of
    assert re.search(r"^debian-12-minimal\s.*libssl3\s+\S+\s+openssl=", made_of, re.M), made_of
    assert "affected: 1 of 1 template version carries openssl" in made_of, made_of
    assert "nothing affected: 1 template version checked for openssl below 1.0" in made_of, made_of
    assert "stock skopeo verified the signature" in oci and "refused by stock skopeo: " in oci, oci
    assert "is not accepted" in oci, oci
    assert re.search(r"oci\.tar: pulled from 127\.0\.0\.1:\d+/tmplbuild/debian-12-minimal@sha256:[0-9a-f]{64} and "
                     r"verified", oci), oci
    assert len(list(work.glob("cache/debian-12-minimal_*_amd64.oci.tar"))) == 1
    tail = proc.stdout[proc.stdout.index("### what the demo left behind"):]
    for path in (work, *built, cache):
        assert str(path) in tail, path
    assert "failed" not in tail
    remove = re.search(r"^remove them with:\n  (rm -rf .*)$", tail, re.M).group(1)
    subprocess.run(["sh", "-c", remove], check=True)
    assert not work.exists() and list((tmp_path / "out").iterdir()) == []
    assert cache.is_dir()  # the package cache is kept, and the output says so


def test_ctrl_c_while_the_server_runs_stops_it_and_leaves_no_process(tmp_path, cache, outputs):
    log = tmp_path / "demo.log"
    with open(log, "wb") as out:
        # Its own session, so that SIGINT to its process group is what Ctrl-C in a terminal sends.
        demo = subprocess.Popen(["sh", "contrib/demo.sh"], cwd=ROOT, env=demo_env(tmp_path, cache), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 1800
        while not re.search(r"^serving .* on http://", log.read_text(), re.M):
            assert demo.poll() is None, failure_excerpt(log.read_text())
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)
        url = server_url(log.read_text())
        os.killpg(demo.pid, signal.SIGINT)
        returncode = demo.wait(timeout=60)
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGKILL)
            demo.wait()
        outputs.append(log.read_text())
        assert_nothing_left(tmp_path, outputs[-1])
    output = log.read_text()
    work = work_dir(output)
    assert returncode != 0, output[-3000:]
    assert_stopped(url)
    assert "### the demo failed or was interrupted" in output
    assert work is not None and f"remove them with:\n  rm -rf '{work}'" in output, output[-3000:]
