"""`tmplbuild test` for real: templates built here, booted under systemd-nspawn, LXC (privileged and
unprivileged) and the Proxmox profile, inside a network namespace the test creates, with dnsmasq serving DHCP
and DNS there. A template that works passes every check; deliberately broken ones fail exactly the check
that is about their fault; nothing the command creates outlives it, even when interrupted."""
from __future__ import annotations

import contextlib
import http.server
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import requests

from tests.conftest import ROOT, can_build
from tests.test_repo import index_of, key, repo  # noqa: F401 - fixtures
from tmplbuild.boot.managers import cgroup_hierarchies, subordinate_range_problem

TAR = ["--numeric-owner", "--xattrs", "--xattrs-include=*"]

SHIPPED = sorted(p.stem for p in (ROOT / "recipes").glob("*.toml"))

pytestmark = [pytest.mark.build, pytest.mark.boot, pytest.mark.skipif(can_build() is not None, reason=str(can_build()))]


def tmplbuild(*args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tmplbuild", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def pid_namespaces() -> set[str]:
    found = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            found.add(os.readlink(f"/proc/{pid}/ns/pid"))
        except OSError:
            continue
    return found


def container_cgroups() -> set[str]:
    """The cgroups made for containers, in every hierarchy: by tmplbuild for systemd-nspawn (tmplbuild-test-*),
    by systemd-nspawn --keep-unit (payload, supervisor) and by LXC (lxc.payload.*, lxc.monitor.*)."""
    found = set()
    for _, mount, own in cgroup_hierarchies():
        for where in {mount, own}:
            for d in where.iterdir():
                if d.is_dir() and (d.name.startswith(("tmplbuild-test-", "lxc.payload.", "lxc.monitor."))
                                   or d.name in ("payload", "supervisor")):
                    found.add(str(d))
    return found


@pytest.fixture(autouse=True)
def no_container_outlives_the_test():
    """A container is a PID namespace: none that the test started may still run after it (a container whose
    manager process was killed keeps running, orphaned, and nothing in its command line names the test), and
    no cgroup made for one may stay behind."""
    before, cgroups = pid_namespaces(), container_cgroups()
    yield
    deadline = time.monotonic() + 5  # a SIGKILLed namespace's processes are reaped asynchronously
    while (left := pid_namespaces() - before) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"{len(left)} container PID namespaces still running after the test"
    assert not container_cgroups() - cgroups, f"cgroups left behind: {sorted(container_cgroups() - cgroups)}"


@pytest.fixture
def work():
    """The --work-dir: under /var/tmp, since an unprivileged container's mapped root must be able to reach it
    (pytest's own tmp dirs are 0700)."""
    path = Path(tempfile.mkdtemp(prefix="tmplbuild-pytest-", dir="/var/tmp"))
    path.chmod(0o711)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def boot_test(artifact: Path, workdir: Path, *args: str) -> tuple[int, dict, str]:
    res = tmplbuild("test", str(artifact), "--json", "--work-dir", str(workdir), "--timeout", "120", *args)
    report = json.loads(res.stdout) if res.stdout.strip().startswith("{") else {}
    return res.returncode, report, res.stderr


def checks_of(report: dict, manager: str) -> dict[str, dict]:
    m = next(m for m in report["managers"] if m["manager"] == manager)
    return {c["name"]: c for c in m["checks"]}


def repack(src: Path, dest: Path, tmp: Path, edit) -> Path:
    """Unpack a template, let `edit(root)` change it, pack it again the way the builder's output unpacks."""
    root = tmp / f"{dest.name}.d"
    root.mkdir()
    subprocess.run(["tar", "--zstd", "-xpf", str(src), "-C", str(root), *TAR], check=True)
    edit(root)
    subprocess.run(["tar", "--zstd", "-cf", str(dest), "-C", str(root), *TAR, "."], check=True)
    shutil.rmtree(root)
    return dest


def assert_nothing_left(workdir: Path) -> None:
    """No network namespace, process, mount or file of `tmplbuild test` remains."""
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert "tmplbuild-test-" not in netns, netns
    mine = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(workdir) in cmd or "tmplbuild-test-" in cmd:
            mine.append(cmd)
    assert not mine, mine
    mounts = [ln.split()[4] for ln in Path("/proc/self/mountinfo").read_text().splitlines()
              if ln.split()[4].startswith(str(workdir))]
    assert not mounts, mounts
    assert list(workdir.iterdir()) == [], list(workdir.iterdir())
    assert not list(Path("/run/lxc/lock").glob(f"{str(workdir).lstrip('/')}*")), "LXC lock directories left"
    assert not list(Path("/run/systemd/nspawn/propagate").glob("tb*")) if Path("/run/systemd/nspawn/propagate").exists() else True


class Forwarder(http.server.ThreadingHTTPServer):
    """What a build through a proxy or an apt cache looks like: a mirror URL on 127.0.0.1 that only this host
    can reach. A template built through it must still name a mirror its containers can reach."""

    def __init__(self, upstream: str) -> None:
        upstream_base = upstream.rstrip("/")

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                with requests.get(upstream_base + self.path, stream=True, timeout=60) as r:
                    self.send_response(r.status_code)
                    self.send_header("Content-Length", r.headers.get("Content-Length", "0"))
                    self.end_headers()
                    for chunk in r.iter_content(1 << 20):
                        self.wfile.write(chunk)

            def log_message(self, *args) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        threading.Thread(target=self.serve_forever, daemon=True).start()


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict:
    """Every shipped recipe, built with one package cache; debian-12-minimal through a local forwarding mirror
    (as through a proxy or an apt cache)."""
    from tmplbuild.builder.mirror import resolve_mirror

    out, cache = tmp_path_factory.mktemp("out"), tmp_path_factory.mktemp("cache")
    forwarder = Forwarder(resolve_mirror(None, None))
    result = {}
    try:
        for name in SHIPPED:
            extra = ["--mirror", forwarder.url] if name == "debian-12-minimal" else []
            res = tmplbuild("build", str(ROOT / "recipes" / f"{name}.toml"), "--out", str(out), "--cache-dir",
                            str(cache), *extra)
            assert res.returncode == 0, res.stderr[-2000:]
            result[name] = next(out.glob(f"{name}_*_amd64.tar.zst"))
    finally:
        forwarder.shutdown()
        forwarder.server_close()
    result["forwarder"] = forwarder.url
    return result


@pytest.fixture(scope="module")
def good(built) -> Path:
    """A template that passes every check: the shipped debian-12-ssh."""
    return built["debian-12-ssh"]


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_template_passes_every_check_under_every_manager(built, work, name):
    rc, report, err = boot_test(built[name], work, "--manager", "all", "--apt-mirror", "named")
    unprivileged = subordinate_range_problem()
    failed = [(m["manager"], c) for m in report.get("managers", []) for c in m["checks"] if c["status"] == "fail"]
    assert rc == 0, (failed, err[-2000:])
    statuses = {m["manager"]: m["status"] for m in report["managers"]}
    assert statuses["nspawn"] == statuses["lxc"] == statuses["proxmox-privileged"] == "pass"
    # Unprivileged, the Proxmox default: plain LXC and the Proxmox profile (make test gives root the id range)
    for mname in ("lxc-unprivileged", "proxmox"):
        if unprivileged is None:
            assert statuses[mname] == "pass"
        else:  # said in one line, not failed silently
            skipped = next(m for m in report["managers"] if m["manager"] == mname)
            assert skipped["status"] == "skip" and "/etc/subuid" in skipped["reason"]
    ssh = "minimal" not in name
    for m in report["managers"]:
        if m["status"] == "skip":
            continue
        got = {c["name"]: c["status"] for c in m["checks"]}
        want = dict.fromkeys(["boot", "network", "dns", "hostname", "hosts", "machine-id", "apt", "sshd",
                              "host-keys", "shutdown"], "pass")
        if not ssh:
            want["sshd"] = want["host-keys"] = "skip"
        assert got == want, (m["manager"], m["checks"])
        assert m["version"] and len(m["containers"]) == 2
    nspawn = checks_of(report, "nspawn")
    assert "host0" in nspawn["network"]["evidence"] and "DHCP lease" in nspawn["network"]["evidence"]
    lxc = checks_of(report, "lxc")
    assert "eth0" in lxc["network"]["evidence"] and "DHCP lease" in lxc["network"]["evidence"]
    for mname in ("proxmox", "proxmox-privileged"):
        if statuses[mname] == "pass":
            proxmox = checks_of(report, mname)
            assert "static" in proxmox["network"]["evidence"] and "DHCP lease" in proxmox["network"]["evidence"]
    versions = {m["manager"]: m["version"] for m in report["managers"] if m["status"] != "skip"}
    assert versions["proxmox-privileged"].endswith(", privileged")
    assert unprivileged is not None or versions["proxmox"].endswith(", unprivileged")
    assert_nothing_left(work)


def test_a_template_built_through_a_proxy_names_the_hosts_mirror_and_keeps_the_managers_name(built, tmp_path):
    """The template's sources are its own setting: building through a local forwarder (a proxy, an apt cache)
    leaves no trace of it in the template, only in the manifest's record of the build."""
    from tmplbuild.builder.mirror import template_mirror

    tarball = built["debian-12-minimal"]
    root = tmp_path / "root"
    root.mkdir()
    subprocess.run(["tar", "--zstd", "-xpf", str(tarball), "-C", str(root), *TAR, "./etc"], check=True)
    sources = (root / "etc/apt/sources.list").read_text()
    forwarder = built["forwarder"]
    assert "127.0.0.1" not in sources and template_mirror(None) + " bookworm main" in sources
    assert [ln.split()[2] for ln in sources.splitlines()] == ["bookworm", "bookworm-updates", "bookworm-security"]
    manifest = json.loads(tarball.with_name(tarball.name.replace(".tar.zst", ".manifest.json")).read_text())
    assert manifest["apt_sources"] == sources.splitlines()
    assert manifest["build"]["mirror"] == forwarder
    # The container keeps the name its manager gives; the resolver is systemd-resolved's stub; hosts is sane.
    assert not (root / "etc/hostname").exists()
    assert os.readlink(root / "etc/resolv.conf") == "../run/systemd/resolve/stub-resolv.conf"
    assert "127.0.0.1\tlocalhost" in (root / "etc/hosts").read_text()
    assert (root / "etc/services").is_file() and (root / "etc/protocols").is_file()  # netbase


@contextlib.contextmanager
def lxc_container(work: Path, name: str):
    """An LXC path on a tmpfs of the test's own and the lxc-* arguments naming `name` in it, with a config that gives
    the container no network at all (lxc.net.0.type = empty); the container is stopped and destroyed afterwards."""
    lxcpath = work / "lxc"
    lxcpath.mkdir()
    conf = work / "empty-net.conf"
    conf.write_text("lxc.net.0.type = empty\nlxc.apparmor.profile = unconfined\n")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0711", "tmplbuild-pytest", str(lxcpath)], check=True)
    lxc = ["-P", str(lxcpath), "-n", name]
    try:
        yield lxc, conf
    finally:
        subprocess.run(["lxc-stop", *lxc, "-k"], capture_output=True, timeout=60)
        subprocess.run(["lxc-wait", *lxc, "-s", "STOPPED", "-t", "30"], capture_output=True, timeout=60)
        subprocess.run(["lxc-destroy", *lxc, "-f"], capture_output=True, timeout=60)
        subprocess.run(["umount", "-l", str(lxcpath)], capture_output=True)


def start_and_wait_running(lxc: list[str]) -> None:
    """lxc-start, then wait for systemd's socket and for the boot to settle: it must say `running`."""
    subprocess.run(["lxc-start", *lxc, "-d"], check=True, timeout=60)
    # lxc-start -d returns before PID 1 listens: wait for its socket, then for the boot to settle.
    state = subprocess.run(["lxc-attach", *lxc, "--", "sh", "-c", "for i in $(seq 300); do "
                            "[ -S /run/systemd/private ] && break; sleep 0.1; done; "
                            "timeout 60 systemctl is-system-running --wait"],
                           capture_output=True, text=True, timeout=120)
    failed = subprocess.run(["lxc-attach", *lxc, "--", "systemctl", "--failed", "--no-legend"],
                            capture_output=True, text=True, timeout=30)
    assert state.stdout.strip() == "running", (state.stdout, failed.stdout)


def test_lxc_create_local_reads_the_xz_template_and_its_metadata_and_boots_without_a_network(built, work):
    """What `lxc-create -t local` needs, unmodified: the .tar.xz and the generated metadata tarball. The container
    comes up `running` with no network at all (lxc.net.0.type = empty): nothing waits for one, nothing fails."""
    tarball = built["debian-12-minimal"]
    xz = tarball.with_name(tarball.name.replace(".tar.zst", ".tar.xz"))
    meta = tarball.with_name(tarball.name.replace(".tar.zst", ".lxc-meta.tar.xz"))
    name = f"tblocal{os.getpid()}"
    with lxc_container(work, name) as (lxc, conf):
        res = subprocess.run(["lxc-create", *lxc, "-f", str(conf), "-t", "local", "--", "--metadata", str(meta),
                              "--fstree", str(xz)], capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stdout + res.stderr
        assert "You just created a container from debian-12-minimal" in res.stdout
        config = (work / "lxc" / name / "config").read_text()
        assert "lxc.include = /usr/share/lxc/config/debian.common.conf" in config and "lxc.arch = x86_64" in config
        start_and_wait_running(lxc)
        hostname = subprocess.run(["lxc-attach", *lxc, "--", "hostname"], capture_output=True, text=True, timeout=30)
        assert hostname.stdout.strip() == name


def test_lxc_oci_creates_a_container_from_the_image_that_boots_and_stops_cleanly(built, work):
    """LXC's own OCI template (`lxc-create -t oci`: skopeo + umoci) takes the image as tmplbuild wrote it (a
    verified copy: what `fetch --oci` or a stock `skopeo copy` under the signedBy policy leaves); the container
    comes up `running` and `lxc-stop` ends it cleanly (systemd's halt, not a kill) within 10 s."""
    archive = built["debian-12-minimal"].with_name(built["debian-12-minimal"].name.replace(".tar.zst", ".oci.tar"))
    name = f"tboci{os.getpid()}"
    with lxc_container(work, name) as (lxc, conf):
        res = subprocess.run(["lxc-create", *lxc, "-f", str(conf), "-t", "oci", "--", "--url",
                              f"oci-archive:{archive}", "--no-cache"], capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stdout + res.stderr
        config = (work / "lxc" / name / "config").read_text()
        assert "lxc.execute.cmd = '\"/sbin/init\" '" in config  # the image's Cmd, no Entrypoint
        start_and_wait_running(lxc)
        started = time.monotonic()
        stop = subprocess.run(["lxc-stop", *lxc, "-t", "10"], capture_output=True, text=True, timeout=60)
        took = time.monotonic() - started
        info = subprocess.run(["lxc-info", *lxc, "-s"], capture_output=True, text=True, timeout=30)
        assert stop.returncode == 0 and "STOPPED" in info.stdout, (stop.stderr, info.stdout)
        assert took < 10, f"lxc-stop took {took:.1f} s: the container did not halt by itself"


def test_tmplbuild_test_boots_the_oci_image_as_it_boots_the_tarball(built, work):
    archive = built["debian-12-minimal"].with_name(built["debian-12-minimal"].name.replace(".tar.zst", ".oci.tar"))
    rc, report, err = boot_test(archive, work, "--manager", "nspawn")
    assert rc == 0, err[-2000:]
    assert report["template"]["file"] == archive.name
    assert {name: c["status"] for name, c in checks_of(report, "nspawn").items()} == {
        "boot": "pass", "network": "pass", "dns": "pass", "hostname": "pass", "hosts": "pass", "machine-id": "pass",
        "apt": "skip", "sshd": "skip", "host-keys": "skip", "shutdown": "pass"}
    assert_nothing_left(work)


def test_publish_boots_the_template_first_and_refuses_one_that_fails(good, tmp_path, key, repo):
    """`tmplbuild publish` runs `tmplbuild test` on every manager here, records the result in the manifest the
    index signs, and publishes nothing when a check fails."""
    home, fpr = key
    out = tmp_path / "out"
    out.mkdir()
    stem = good.name[: -len(".tar.zst")]
    for f in good.parent.glob(f"{stem}.*"):
        shutil.copy(f, out)
    res = tmplbuild("publish", str(out / f"{stem}.manifest.json"), "--repo", str(repo), "--key", fpr,
                    "--gnupghome", str(home))
    assert res.returncode == 0, res.stderr[-3000:]
    (entry,) = index_of(repo)["templates"]
    assert [f["format"] for f in entry["files"]] == ["tar.zst", "tar.xz", "oci.tar", "lxc-meta.tar.xz", "spdx.json",
                                                     "cdx.json", "intoto.json"]
    manifest = json.loads((repo / entry["manifest"]["path"]).read_text())
    assert manifest["test"]["result"] == "pass" and manifest["test"]["sha256"] == entry["files"][0]["sha256"]
    assert {m["manager"] for m in manifest["test"]["managers"]} == {"nspawn", "lxc", "lxc-unprivileged", "proxmox",
                                                                   "proxmox-privileged"}

    def break_it(root: Path) -> None:
        (root / "etc/hostname").write_text("localhost\n")

    broken = repack(good, out / "broken.tar.zst", tmp_path, break_it)
    version = manifest["version"] + ".9"
    bad_stem = f"{manifest['name']}_{version}_amd64"
    broken = broken.rename(out / f"{bad_stem}.tar.zst")
    from tmplbuild.files import hash_file

    size, sha256, sha512 = hash_file(broken)
    bad = {**manifest, "version": version, "test": None, "oci": None,  # a tarball only
           "artifacts": [{"file": broken.name, "format": "tar.zst", "size": size, "sha256": sha256, "sha512": sha512}]}
    (out / f"{bad_stem}.manifest.json").write_text(json.dumps(bad))
    before = index_of(repo)
    res = tmplbuild("publish", str(out / f"{bad_stem}.manifest.json"), "--repo", str(repo), "--key", fpr,
                    "--gnupghome", str(home))
    assert res.returncode == 8, res.stderr[-3000:]
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("tmplbuild: template test: ") and "hostname" in last and "not published" in last
    assert index_of(repo) == before


def test_identity_and_boot_faults_are_each_caught_by_their_check(good, tmp_path, work):
    def break_it(root: Path) -> None:
        unit = root / "etc/systemd/system/tb-broken.service"
        unit.write_text("[Unit]\nDescription=fails on purpose\n\n[Service]\nType=oneshot\nExecStart=/bin/false\n\n"
                        "[Install]\nWantedBy=multi-user.target\n")
        (root / "etc/systemd/system/multi-user.target.wants/tb-broken.service").symlink_to(
            "/etc/systemd/system/tb-broken.service")
        (root / "etc/hostname").write_text("localhost\n")
        (root / "etc/machine-id").write_text("0123456789abcdef0123456789abcdef\n")
        subprocess.run(["ssh-keygen", "-A", "-f", str(root)], check=True, capture_output=True)

    broken = repack(good, tmp_path / "broken_1_amd64.tar.zst", tmp_path, break_it)
    rc, report, err = boot_test(broken, work, "--manager", "lxc")
    assert rc == 8, err
    assert "template test" in err.strip().splitlines()[-1] and "lxc:" in err
    got = checks_of(report, "lxc")
    assert got["boot"]["status"] == "fail" and "tb-broken.service" in got["boot"]["evidence"]
    assert got["hostname"]["status"] == "fail" and "/etc/hostname says 'localhost'" in got["hostname"]["evidence"]
    assert got["machine-id"]["status"] == "fail" and "the one the template ships" in got["machine-id"]["evidence"]
    assert got["host-keys"]["status"] == "fail" and "share host keys" in got["host-keys"]["evidence"]
    # The faults are not network faults: those checks still pass, so each failure points at its own cause.
    assert got["network"]["status"] == got["dns"]["status"] == got["sshd"]["status"] == "pass"
    assert_nothing_left(work)


def test_a_template_without_a_dhcp_client_fails_network_and_dns(good, tmp_path, work):
    def break_it(root: Path) -> None:
        for unit in ("systemd-networkd.service", "systemd-networkd.socket"):
            link = root / "etc/systemd/system" / unit
            link.unlink(missing_ok=True)
            link.symlink_to("/dev/null")

    broken = repack(good, tmp_path / "nodhcp_1_amd64.tar.zst", tmp_path, break_it)
    start = time.monotonic()
    rc, report, err = boot_test(broken, work, "--manager", "nspawn")
    assert rc == 8, err
    got = checks_of(report, "nspawn")
    assert got["network"]["status"] == "fail"
    assert "no IPv4 lease" in got["network"]["evidence"] and "no DHCP client running" in got["network"]["evidence"]
    assert got["dns"]["status"] == "fail"
    assert got["hostname"]["status"] == got["machine-id"]["status"] == "pass"
    # Without a DHCP client there is nothing to wait for: the verdict comes without the 20 s lease grace.
    assert time.monotonic() - start < 60
    assert_nothing_left(work)


def test_dns_and_apt_faults_are_caught_while_the_network_works(good, tmp_path, work):
    def break_it(root: Path) -> None:
        (root / "etc/resolv.conf").unlink()
        (root / "etc/resolv.conf").write_text("")           # resolved's stub no longer used: nobody to ask
        (root / "etc/apt/sources.list").write_text("deb http://127.0.0.1:3142/debian bookworm main\n")

    broken = repack(good, tmp_path / "nodns_1_amd64.tar.zst", tmp_path, break_it)
    rc, report, err = boot_test(broken, work, "--manager", "nspawn", "--apt-mirror", "named")
    assert rc == 8, err
    got = checks_of(report, "nspawn")
    assert got["network"]["status"] == "pass"
    assert got["dns"]["status"] == "fail" and "nameservers: none" in got["dns"]["evidence"]
    assert got["apt"]["status"] == "fail" and "127.0.0.1" in got["apt"]["evidence"]
    assert_nothing_left(work)


def test_apt_against_a_local_mirror_fixture_reports_what_apt_said(good, tmp_path, work):
    empty_mirror = tmp_path / "mirror"
    empty_mirror.mkdir()
    rc, report, err = boot_test(good, work, "--manager", "nspawn", "--apt-mirror", empty_mirror.as_uri())
    assert rc == 8, err
    got = checks_of(report, "nspawn")
    assert got["apt"]["status"] == "fail" and "apt-get update exit" in got["apt"]["evidence"]
    assert got["network"]["status"] == got["dns"]["status"] == "pass"
    assert_nothing_left(work)


def test_each_nspawn_container_runs_in_a_cgroup_of_its_own(good, work):
    """Without systemd as the host's PID 1, systemd-nspawn --keep-unit makes the cgroup it runs in its
    container's. Both containers of a run used to share one, and their systemds created and removed each other's
    unit cgroups: now and then a unit failed with 219/CGROUP and the template failed `boot` through no fault of
    its own (CI saw systemd-remount-fs.service and systemd-tmpfiles-setup.service fail so)."""
    if Path("/proc/1/comm").read_text().strip() == "systemd":
        pytest.skip("systemd is PID 1 here: systemd-nspawn runs each container in a scope unit of its own")
    proc = subprocess.Popen([sys.executable, "-m", "tmplbuild", "test", str(good), "--manager", "nspawn",
                             "--work-dir", str(work)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        own_ns = os.readlink("/proc/self/ns/pid")
        cgroups: dict[int, str] = {}
        deadline = time.monotonic() + 60
        while len(cgroups) < 2:  # the PID 1 of each container: a child of its systemd-nspawn, in another namespace
            assert proc.poll() is None and time.monotonic() < deadline, "two containers did not start within 60 s"
            nspawns = subprocess.run(["pgrep", "-f", f"^systemd-nspawn .*{work}"], capture_output=True, text=True)
            for pid in nspawns.stdout.split():
                with contextlib.suppress(OSError):
                    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
                        if os.readlink(f"/proc/{child}/ns/pid") != own_ns:
                            cgroups[int(child)] = Path(f"/proc/{child}/cgroup").read_text()
            time.sleep(0.1)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            proc.communicate(timeout=60)
    assert proc.returncode == 0, err.decode()[-2000:]
    first, second = ({ln.split(":", 2)[1]: ln.split(":", 2)[2] for ln in text.splitlines()} for text in cgroups.values())
    managed = [h for h in ("name=systemd", "") if h in first]  # the hierarchies systemd in a container manages
    assert managed, first
    for hierarchy in managed:
        assert first[hierarchy] != second[hierarchy], (hierarchy, first[hierarchy])
        assert "/tmplbuild-test-" in first[hierarchy] and "/tmplbuild-test-" in second[hierarchy], hierarchy


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_test_leaves_no_container_namespace_or_file(good, work, sig):
    proc = subprocess.Popen([sys.executable, "-m", "tmplbuild", "test", str(good), "--manager", "nspawn,lxc",
                             "--work-dir", str(work)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # until a container is up
        running = subprocess.run(["pgrep", "-f", f"systemd-nspawn.*{work}"], capture_output=True).returncode == 0
        if running and any(work.glob("tmplbuild-test.*/dnsmasq.leases")):
            break
        time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("no container started within 60 s")
    time.sleep(1.0)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err.decode()
    assert_nothing_left(work)


def test_what_a_sigkilled_run_left_is_reaped_by_the_next(good, work):
    """SIGKILL is the one signal a run cannot clean up after: its containers, namespace and tmpfs stay. The next
    run removes them (only those of runs whose process is gone) before it starts."""
    from tmplbuild.boot.runner import reap_stale

    proc = subprocess.Popen([sys.executable, "-m", "tmplbuild", "test", str(good), "--manager", "lxc",
                             "--work-dir", str(work)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not subprocess.run(["pgrep", "-f", f"lxc monitor. {work}"], capture_output=True).returncode == 0:
        assert time.monotonic() < deadline, "no container started within 60 s"
        time.sleep(0.2)
    time.sleep(1.0)
    proc.kill()
    proc.wait()
    assert "tmplbuild-test-" in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert any(work.iterdir())
    reap_stale(work)
    time.sleep(0.5)  # SIGKILLed container inits are reaped by the host's PID 1
    assert_nothing_left(work)
