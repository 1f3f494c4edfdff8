"""`tmplbuild test` for real: templates built here, booted under systemd-nspawn, LXC (privileged and
unprivileged) and the Proxmox profile, inside a network namespace the test creates, with dnsmasq serving DHCP
and DNS there. A template that works passes every check; deliberately broken ones fail exactly the check
that is about their fault; nothing the command creates outlives it, even when interrupted."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, can_build
from tmplbuild.boot.managers import subordinate_range_problem

TAR = ["--numeric-owner", "--xattrs", "--xattrs-include=*"]

GOOD_RECIPE = '''\
# What issue 10 will make the shipped recipes do, as a fixture: networkd + resolved for LXC and nspawn,
# ifupdown + dhclient for what Proxmox writes, udev for unprivileged LXC (/sys is writable there, so networkd
# waits for udev), a sane /etc/hosts. The build's clean-up still writes /etc/hostname and an empty
# resolv.conf; `good` below removes them from the tarball.
extends = "debian-12-ssh"

[template]
name = "boot-good"
variant = "boot-good"
description = "tmplbuild test fixture: a template that works as a container"

[[files]]
dest = "/etc/systemd/network/80-container.network"
content = "[Match]\\nName=host0 eth0\\n\\n[Network]\\nDHCP=ipv4\\n"
mode = "0644"

[[files]]
dest = "/etc/hosts"
content = "127.0.0.1\\tlocalhost\\n::1\\t\\tlocalhost ip6-localhost ip6-loopback\\n"
mode = "0644"

[[scripts]]
stage = "post-install"
run = """
apt-get install -y -q systemd-resolved udev isc-dhcp-client
systemctl enable systemd-networkd systemd-resolved
systemctl mask sys-kernel-debug.mount
"""
'''

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


@pytest.fixture(autouse=True)
def no_container_outlives_the_test():
    """A container is a PID namespace: none that the test started may still run after it (a container whose
    manager process was killed keeps running, orphaned, and nothing in its command line names the test)."""
    before = pid_namespaces()
    yield
    deadline = time.monotonic() + 5  # a SIGKILLed namespace's processes are reaped asynchronously
    while (left := pid_namespaces() - before) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"{len(left)} container PID namespaces still running after the test"


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


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    """debian-12-minimal as shipped, and the `boot-good` fixture recipe, built with one package cache."""
    recipes = tmp_path_factory.mktemp("recipes")
    shutil.copytree(ROOT / "recipes", recipes, dirs_exist_ok=True)
    (recipes / "boot-good.toml").write_text(GOOD_RECIPE)
    out, cache = tmp_path_factory.mktemp("out"), tmp_path_factory.mktemp("cache")
    result = {}
    for name in ("debian-12-minimal", "boot-good"):
        res = tmplbuild("build", str(recipes / f"{name}.toml"), "--out", str(out), "--cache-dir", str(cache))
        assert res.returncode == 0, res.stderr[-2000:]
        result[name] = next(out.glob(f"{name}_*_amd64.tar.zst"))
    return result


@pytest.fixture(scope="module")
def good(built, tmp_path_factory) -> Path:
    def fix(root: Path) -> None:
        # What the builder's clean-up cannot yet leave alone (issue 10): the manager's hostname, resolved's stub.
        (root / "etc/hostname").unlink()
        (root / "etc/resolv.conf").unlink()
        (root / "etc/resolv.conf").symlink_to("../run/systemd/resolve/stub-resolv.conf")

    tmp = tmp_path_factory.mktemp("good")
    return repack(built["boot-good"], tmp / "boot-good_1_amd64.tar.zst", tmp, fix)


def test_a_working_template_passes_every_check_under_every_manager(good, work):
    rc, report, err = boot_test(good, work, "--manager", "all", "--apt-mirror", "named")
    unprivileged = subordinate_range_problem()
    assert rc == 0, (err[-3000:], json.dumps(report, indent=1)[-6000:])
    statuses = {m["manager"]: m["status"] for m in report["managers"]}
    assert statuses["nspawn"] == statuses["lxc"] == statuses["proxmox"] == "pass"
    if unprivileged is None:
        assert statuses["lxc-unprivileged"] == "pass"
    else:  # said in one line, not failed silently
        skipped = next(m for m in report["managers"] if m["manager"] == "lxc-unprivileged")
        assert skipped["status"] == "skip" and "/etc/subuid" in skipped["reason"]
    for m in report["managers"]:
        if m["status"] == "skip":
            continue
        got = {c["name"]: c["status"] for c in m["checks"]}
        assert got == dict.fromkeys(["boot", "network", "dns", "hostname", "hosts", "machine-id", "apt", "sshd",
                                     "host-keys", "shutdown"], "pass"), (m["manager"], m["checks"])
        assert m["version"] and len(m["containers"]) == 2
    nspawn = checks_of(report, "nspawn")
    assert "host0" in nspawn["network"]["evidence"] and "DHCP lease" in nspawn["network"]["evidence"]
    proxmox = checks_of(report, "proxmox")
    assert "static" in proxmox["network"]["evidence"] and "DHCP lease" in proxmox["network"]["evidence"]
    assert_nothing_left(work)


@pytest.fixture(scope="module")
def shipped_report(built) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="tmplbuild-pytest-", dir="/var/tmp"))
    workdir.chmod(0o711)
    rc, report, err = boot_test(built["debian-12-minimal"], workdir, "--manager", "all")
    shutil.rmtree(workdir, ignore_errors=True)
    assert rc in (0, 8), err[-3000:]
    return report


@pytest.mark.parametrize("manager", ["nspawn", "lxc", "lxc-unprivileged", "proxmox"])
@pytest.mark.xfail(strict=True, reason="issue 10: the shipped recipes have no DHCP client, /etc/hostname says "
                                       "localhost, no /etc/hosts, an empty resolv.conf (and unprivileged LXC fails "
                                       "sys-kernel-debug.mount)")
def test_shipped_minimal_template_passes_under(shipped_report, manager):
    m = next(m for m in shipped_report["managers"] if m["manager"] == manager)
    if m["status"] == "skip":
        pytest.skip(m["reason"])
    assert m["status"] == "pass", [c for c in m["checks"] if c["status"] == "fail"]


def test_shipped_minimal_template_boots_with_a_fresh_identity_today(shipped_report):
    """What already works on the shipped template, and must keep working."""
    for manager in ("nspawn", "lxc"):
        got = checks_of(shipped_report, manager)
        assert got["boot"]["status"] == "pass", got["boot"]
        assert got["machine-id"]["status"] == "pass", got["machine-id"]
        assert got["shutdown"]["status"] == "pass", got["shutdown"]
        assert got["sshd"]["status"] == "skip"  # minimal ships no sshd
        assert got["apt"]["status"] == "skip" and "--apt-mirror" in got["apt"]["evidence"]


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
