"""The container managers `tmplbuild test` boots a template in: systemd-nspawn, LXC (privileged and
unprivileged) and the Proxmox profile (LXC configured the way `pct create` configures a Debian container).

Every container runs inside the test's own network namespace (netns-exec.sh), so its veth, bridge and DHCP
traffic exist only there. Commands inside a container go through nsenter into its PID 1's namespaces, so the
checks need nothing from the template but what they test."""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from tmplbuild.boot.netns import DOMAIN, Subnet, TestNetwork
from tmplbuild.errors import LocalIOError
from tmplbuild.run import CLEAN_ENV, kill_group

INSIDE_ENV = ["env", "-i", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL=C.UTF-8",
              "HOME=/root", "TERM=dumb", "DEBIAN_FRONTEND=noninteractive", "SYSTEMD_PAGER=", "SYSTEMD_COLORS=0"]
SIGRTMIN_4 = signal.SIGRTMIN + 4  # systemd as PID 1: power off (what machinectl poweroff and pct shutdown send)
UNPRIVILEGED_BASE = 100000


@dataclass
class Result:
    rc: int
    out: str

    @property
    def ok(self) -> bool:
        return self.rc == 0


@dataclass
class Container:
    name: str
    rootfs: Path
    interface: str
    log: Path
    proc: subprocess.Popen[bytes] | None = None   # nspawn: the manager process; LXC: lxc-start (daemonizes)
    leader: int | None = None                     # the container's PID 1, in the host's PID namespace
    subnet: Subnet | None = None
    static: str | None = None                     # "A.B.C.D/N" when the profile configures a static address
    started: float = field(default_factory=time.monotonic)
    stopped: bool = False
    emulated: bool = False                        # another architecture, run by qemu-user (tmplbuild.boot.emulation)
    offline: str = ""                             # why qemu-user kept it off the test network (checks.network)
    cgroups: list[Path] = field(default_factory=list)  # nspawn without systemd as PID 1: the cgroups made for it

    def exec(self, *argv: str, timeout: float = 30.0) -> Result:
        """Run argv inside the container (all its namespaces, its root), with a clean environment."""
        if self.leader is None:
            return Result(127, "container has no PID 1")
        return _capture(["nsenter", "-t", str(self.leader), "-a", *INSIDE_ENV, *argv], timeout)

    def host_exec(self, ns: str, *argv: str, timeout: float = 10.0) -> Result:
        """Run a host tool in one of the container's namespaces only (e.g. ns="--net": `ip` of the host)."""
        if self.leader is None:
            return Result(127, "container has no PID 1")
        return _capture(["nsenter", "-t", str(self.leader), ns, *argv], timeout)

    def read(self, rel: str) -> str | None:
        """A file of the running container, through /proc/PID/root (its own root: its symlinks stay inside)."""
        if self.leader is None:
            return None
        path = Path(f"/proc/{self.leader}/root") / rel.lstrip("/")
        try:
            # chroot-like resolution: an absolute symlink inside the container resolves against /proc/PID/root.
            return path.read_text(errors="replace")
        except OSError:
            return None

    def processes(self) -> list[str]:
        """Names (comm) of the processes in the container's PID namespace."""
        if self.leader is None:
            return []
        try:
            mine = os.readlink(f"/proc/{self.leader}/ns/pid")
        except OSError:
            return []
        names = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                if os.readlink(f"/proc/{entry}/ns/pid") == mine:
                    names.append(Path(f"/proc/{entry}/comm").read_text().strip())
            except OSError:
                continue
        return names

    def alive(self) -> bool:
        return self.leader is not None and Path(f"/proc/{self.leader}").exists()


class Manager:
    """One way of running containers. `available()` says why not, or None."""

    name: str = ""
    letter: str = ""          # in container names: tb<run tag><letter><n>
    interface: str = "eth0"

    def __init__(self, net: TestNetwork, workdir: Path) -> None:
        self.net = net
        self.workdir = workdir

    def describe(self) -> str:
        """The tool and its version, and how this run uses it."""
        return self.version()

    def forget(self, container: Container) -> None:
        """Remove what the manager keeps about a stopped container outside the work directory."""

    def close(self) -> None:
        """Remove what the manager keeps about this run outside the work directory."""

    @classmethod
    def available(cls) -> str | None:
        raise NotImplementedError

    @classmethod
    def version(cls) -> str:
        raise NotImplementedError

    uid_offset = 0

    @classmethod
    def unfit(cls, workdir: Path) -> str | None:
        """Why this manager cannot run containers under `workdir`, or None."""
        return None

    def prepare(self, container: Container, index: int) -> None:
        """Configure the rootfs before boot, as the host would at create time (the Proxmox profile)."""

    def start(self, container: Container) -> None:
        raise NotImplementedError

    def wait_stopped(self, container: Container, timeout: float) -> bool:
        raise NotImplementedError

    def kill(self, container: Container) -> None:
        """Stop a container at once. Its PID 1 first: killing only the manager's process (systemd-nspawn, an LXC
        monitor) leaves the container running, orphaned, with its own PID namespace."""
        if container.leader is not None and container.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(container.leader, signal.SIGKILL)
        self._kill_manager(container)

    def _kill_manager(self, container: Container) -> None:
        raise NotImplementedError

    def poweroff(self, container: Container, timeout: float) -> tuple[bool, float]:
        """Ask PID 1 to power off and wait; (stopped cleanly within timeout, seconds taken)."""
        start = time.monotonic()
        if container.leader is None or not container.alive():
            return False, 0.0
        if container.emulated:
            # qemu-user shifts real-time signals (the guest sees SIGRTMIN+4 as another one, a rescue or nothing at
            # all): ask PID 1 through systemctl instead, as `machinectl poweroff` would in the end.
            container.exec("systemctl", "poweroff", "--no-block", timeout=min(timeout, 60))
        else:
            try:
                os.kill(container.leader, SIGRTMIN_4)
            except ProcessLookupError:
                pass
        clean = self.wait_stopped(container, timeout)
        if clean:
            container.stopped = True
        return clean, time.monotonic() - start


def _capture(argv: list[str], timeout: float) -> Result:
    try:
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=max(timeout, 0.1),
                              env=CLEAN_ENV, start_new_session=True)
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"") + (exc.stderr or b"")
        return Result(124, out.decode(errors="replace") + f"\n(timed out after {timeout:.0f} s)")
    except FileNotFoundError as exc:
        return Result(127, f"cannot run {argv[0]}: {exc.strerror}")
    return Result(proc.returncode, (proc.stdout + proc.stderr).decode(errors="replace"))


def _pid1_is_systemd() -> bool:
    try:
        return Path("/proc/1/comm").read_text().strip() == "systemd"
    except OSError:
        return False


def _tool_version(argv: list[str]) -> str:
    res = _capture(argv, 10)
    return res.out.strip().splitlines()[0] if res.ok and res.out.strip() else "unknown"


class Nspawn(Manager):
    name = "nspawn"
    letter = "n"
    interface = "host0"

    @classmethod
    def available(cls) -> str | None:
        if not shutil.which("systemd-nspawn"):
            return "systemd-nspawn is not installed (apt-get install systemd-container)"
        return None

    @classmethod
    def version(cls) -> str:
        return _tool_version(["systemd-nspawn", "--version"])

    def start(self, container: Container) -> None:
        argv = ["systemd-nspawn", "--quiet", "--boot", f"--directory={container.rootfs}",
                f"--machine={container.name}", "--network-veth", "--console=read-only",
                "--link-journal=no", "--resolv-conf=off", "--timezone=off"]
        join: list[str] = []
        if not _pid1_is_systemd():
            # Without systemd as the host's PID 1 there is no machined to register with and no unit to scope into.
            argv[1:1] = ["--register=no", "--keep-unit"]
            # --keep-unit makes the cgroup systemd-nspawn runs in the container's own: two containers started from
            # one cgroup would share it, and their systemds would create and remove each other's unit cgroups
            # (a unit then fails with 219/CGROUP). Each container gets a cgroup of its own, joined before exec.
            container.cgroups = own_cgroups(f"{CGROUP_PREFIX}{os.getpid()}-{container.name}")
            if container.cgroups:
                join = ["sh", "-c", JOIN_CGROUPS, "sh", *(str(d / "cgroup.procs") for d in container.cgroups), "--"]
        argv = join + self.net.argv(*argv)
        with open(container.log, "ab") as log:
            container.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                              stderr=subprocess.STDOUT, env=CLEAN_ENV, start_new_session=True)
        container.subnet = self.net.adopt_link(_veth_name(container.name))
        container.leader = self._find_leader(container.proc, 15.0)

    def _find_leader(self, proc: subprocess.Popen[bytes], wait: float) -> int:
        own = os.readlink("/proc/self/ns/pid")
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise LocalIOError("nspawn", f"systemd-nspawn exited {proc.returncode} before the container started")
            for child in _children(proc.pid):
                try:
                    if os.readlink(f"/proc/{child}/ns/pid") != own:
                        return child
                except OSError:
                    continue
            time.sleep(0.05)
        raise LocalIOError("nspawn", f"no container PID 1 under systemd-nspawn within {wait:.0f} s")

    def wait_stopped(self, container: Container, timeout: float) -> bool:
        if container.proc is None:
            return True
        try:
            container.proc.wait(timeout)
            return True
        except subprocess.TimeoutExpired:
            return False

    def _kill_manager(self, container: Container) -> None:
        if container.proc is not None and container.proc.poll() is None:
            kill_group(container.proc)

    def forget(self, container: Container) -> None:
        # systemd-nspawn leaves an empty propagation directory behind when it runs without machined.
        with contextlib.suppress(OSError):
            os.rmdir(f"/run/systemd/nspawn/propagate/{container.name}")
        if container.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                container.proc.wait(10)  # a killed manager's processes leave its cgroup when they are reaped
        remove_cgroups(container.cgroups)


CGROUP_PREFIX = "tmplbuild-test-"  # then the pid of the run and the container's name
# sh -c JOIN_CGROUPS sh FILE... -- ARGV: write this shell's pid into each cgroup.procs FILE, then exec ARGV.
JOIN_CGROUPS = 'while [ "$1" != -- ]; do echo $$ > "$1" || exit 125; shift; done; shift; exec "$@"'


def cgroup_hierarchies() -> list[tuple[str, Path, Path]]:
    """Each cgroup hierarchy mounted here, as (its key in /proc/self/cgroup: "" for cgroup2, "name=systemd", a
    v1 controller list; where it is mounted; the directory of this process's own cgroup in it)."""
    try:
        own = dict(line.split(":", 2)[1:] for line in Path("/proc/self/cgroup").read_text().splitlines())
        mounts = Path("/proc/self/mountinfo").read_text().splitlines()
    except (OSError, ValueError):
        return []
    found: dict[str, tuple[str, Path, Path]] = {}
    for line in mounts:
        left, _, right = line.partition(" - ")
        fields, fs = left.split(), right.split()
        if len(fields) < 5 or len(fs) < 3 or fs[0] not in ("cgroup", "cgroup2"):
            continue
        opts = set(fs[2].split(","))
        key = "" if fs[0] == "cgroup2" else next((k for k in own if k and set(k.split(",")) <= opts), None)
        if key is None or key in found or key not in own:
            continue
        root, path = fields[3], own[key]
        if root != "/" and path != root and not path.startswith(root + "/"):
            continue  # this process's cgroup is not inside what is mounted here
        mount = Path(fields[4])
        found[key] = (key, mount, mount / path[len(root) if root != "/" else 0:].lstrip("/"))
    return list(found.values())


def own_cgroups(name: str) -> list[Path]:
    """A cgroup called `name` under this process's own in the hierarchies systemd manages (name=systemd and
    cgroup2), made now; [] where they cannot be made (nothing is left half-made)."""
    made: list[Path] = []
    for key, _, base in cgroup_hierarchies():
        if key not in ("", "name=systemd"):
            continue
        try:
            (base / name).mkdir()
        except OSError:
            for d in made:
                remove_cgroup(d)
            return []
        made.append(base / name)
    return made


def remove_cgroup(path: Path) -> None:
    """Remove a cgroup and the cgroups under it, deepest first; a cgroup a process still runs in stays."""
    for dirpath, _, _ in os.walk(path, topdown=False):
        with contextlib.suppress(OSError):
            os.rmdir(dirpath)


def remove_cgroups(paths: list[Path], wait: float = 5.0) -> None:
    """remove_cgroup each, waiting up to `wait` seconds for the processes of a killed container to be reaped
    (they leave its cgroups a moment after its PID 1 is gone)."""
    deadline = time.monotonic() + wait
    while True:
        for path in paths:
            remove_cgroup(path)
        if not any(path.exists() for path in paths) or time.monotonic() > deadline:
            return
        time.sleep(0.1)


def forget_cgroups(run_gone) -> None:
    """Remove the cgroups made for containers of runs `run_gone(pid)` says are over (a SIGKILLed run's)."""
    for _, _, base in cgroup_hierarchies():
        for cgroup in base.glob(f"{CGROUP_PREFIX}*"):
            if run_gone(cgroup.name[len(CGROUP_PREFIX):].split("-", 1)[0]):
                remove_cgroup(cgroup)


def forget_lxc_cgroups(names: list[str]) -> None:
    """LXC's cgroups of stopped containers (lxc.payload.NAME, lxc.monitor.NAME), where LXC keeps them: at the
    top of each hierarchy or under this process's own cgroup. An LXC monitor killed with its run leaves them."""
    remove_cgroups([where / f"lxc.{kind}.{name}" for _, mount, base in cgroup_hierarchies() for where in {mount, base}
                    for name in names for kind in ("payload", "monitor")])


def _veth_name(machine: str) -> str:
    # systemd-nspawn names the host side "ve-" + the machine name; names here are short enough never to be hashed.
    return f"ve-{machine}"[:15]


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            kids += [int(c) for c in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
    except OSError:
        pass
    return kids


class Lxc(Manager):
    name = "lxc"
    letter = "l"
    interface = "eth0"
    unprivileged = False

    def __init__(self, net: TestNetwork, workdir: Path) -> None:
        super().__init__(net, workdir)
        self.lxcpath = workdir / "lxc"
        self.lxcpath.mkdir(exist_ok=True)
        # Made here, before the per-container steps run in threads (the Proxmox profile's prepare needs it).
        self.bridge: Subnet = net.add_bridge(f"tb{self.name[:3]}")

    @classmethod
    def available(cls) -> str | None:
        if not shutil.which("lxc-start"):
            return "LXC is not installed (apt-get install lxc)"
        return None

    @classmethod
    def version(cls) -> str:
        return "lxc " + _tool_version(["lxc-start", "--version"])

    def describe(self) -> str:
        return self.version() + (", unprivileged" if self.unprivileged else ", privileged")

    def forget(self, container: Container) -> None:
        forget_lxc_cgroups([container.name])

    def close(self) -> None:
        forget_lxc_locks(self.lxcpath)

    def config_lines(self, container: Container) -> list[str]:
        lines = [
            "lxc.include = /usr/share/lxc/config/debian.common.conf",
            f"lxc.uts.name = {container.name}",
            f"lxc.rootfs.path = dir:{container.rootfs}",
            "lxc.apparmor.profile = unconfined",
            "lxc.net.0.type = veth",
            f"lxc.net.0.link = {self.bridge.link}",
            "lxc.net.0.name = eth0",
            "lxc.net.0.flags = up",
        ]
        if self.unprivileged:
            lines[1:1] = ["lxc.include = /usr/share/lxc/config/debian.userns.conf",
                          f"lxc.idmap = u 0 {UNPRIVILEGED_BASE} 65536", f"lxc.idmap = g 0 {UNPRIVILEGED_BASE} 65536"]
        return lines

    def start(self, container: Container) -> None:
        container.subnet = self.bridge
        cdir = self.lxcpath / container.name
        cdir.mkdir(exist_ok=True)
        (cdir / "config").write_text("\n".join(self.config_lines(container)) + "\n")
        if self.unprivileged:
            # The container's root (a mapped uid) must be able to reach its rootfs.
            for path in (self.workdir, self.lxcpath, cdir, container.rootfs.parent):
                path.chmod(0o711)
        argv = ["lxc-start", "-n", container.name, "-P", str(self.lxcpath), "-d", "-l", "INFO", "-o", str(container.log)]
        res = _capture(self.net.argv(*argv), 30)
        if not res.ok:
            raise LocalIOError(self.name, f"lxc-start {container.name} failed: {_last_error(container.log, res.out)}")
        info = _capture(self.net.nsenter("lxc-info", "-n", container.name, "-P", str(self.lxcpath), "-pH"), 10)
        if not info.ok or not info.out.strip().isdigit():
            raise LocalIOError(self.name, f"lxc-info {container.name}: no PID 1 ({info.out.strip()[:200]})")
        container.leader = int(info.out.strip())

    def wait_stopped(self, container: Container, timeout: float) -> bool:
        res = _capture(self.net.nsenter("lxc-wait", "-n", container.name, "-P", str(self.lxcpath), "-s", "STOPPED",
                                        "-t", str(max(int(timeout), 1))), timeout + 5)
        return res.ok

    def _kill_manager(self, container: Container) -> None:
        _capture(self.net.nsenter("lxc-stop", "-n", container.name, "-P", str(self.lxcpath), "-k"), 20)


def forget_lxc_locks(lxcpath: Path) -> None:
    """LXC keeps a lock directory per container path under /run/lxc/lock; remove ours and its empty parents."""
    base = Path("/run/lxc/lock")
    lock = Path(f"{base}{lxcpath}")
    shutil.rmtree(lock, ignore_errors=True)
    for parent in lock.parents:
        if parent == base or not str(parent).startswith(str(base)):
            break
        try:
            parent.rmdir()
        except OSError:
            break


def _last_error(log: Path, fallback: str) -> str:
    try:
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if " ERROR " in ln]
    except OSError:
        lines = []
    text = lines[0] if lines else fallback.strip().splitlines()[-1] if fallback.strip() else "no output"
    return text.split(" - ", 1)[-1][:300]


def subordinate_range_problem() -> str | None:
    """Why root cannot map an unprivileged container's ids here, or None: newuidmap (which LXC uses) needs a
    range of 65536 ids starting at 100000 for root in /etc/subuid and /etc/subgid, as Proxmox configures."""
    if not shutil.which("newuidmap"):
        return "newuidmap is not installed (apt-get install uidmap)"
    for path in ("/etc/subuid", "/etc/subgid"):
        ok = False
        try:
            for line in Path(path).read_text().splitlines():
                parts = line.strip().split(":")
                if len(parts) == 3 and parts[0] in ("root", "0") and parts[1].isdigit() and parts[2].isdigit():
                    start, count = int(parts[1]), int(parts[2])
                    ok = ok or (start <= UNPRIVILEGED_BASE and start + count >= UNPRIVILEGED_BASE + 65536)
        except OSError:
            pass
        if not ok:
            return f"root has no subordinate range {UNPRIVILEGED_BASE}:65536 in {path} (add the line root:{UNPRIVILEGED_BASE}:65536 to /etc/subuid and /etc/subgid)"
    return None


class LxcUnprivileged(Lxc):
    name = "lxc-unprivileged"
    letter = "u"
    unprivileged = True
    uid_offset = UNPRIVILEGED_BASE

    @classmethod
    def available(cls) -> str | None:
        return Lxc.available() or subordinate_range_problem()

    @classmethod
    def unfit(cls, workdir: Path) -> str | None:
        from tmplbuild.boot.rootfs import traversal_problem

        return traversal_problem(workdir)


class Proxmox(LxcUnprivileged):
    """LXC with what `pct create`/`pct start` write into a Debian container (tmplbuild/boot/proxmox.py), the
    first container by DHCP, the second with a static address; unprivileged, as `pct create` makes one by default
    (ProxmoxPrivileged: `--unprivileged 0`). An emulation: pct itself is not run."""

    name = "proxmox"
    letter = "p"

    @classmethod
    def version(cls) -> str:
        return Lxc.version() + " + pct emulation"

    def prepare(self, container: Container, index: int) -> None:
        from tmplbuild.boot.proxmox import PveNet, pct_setup

        subnet = self.bridge
        if index == 0:
            nets = [PveNet(name="eth0", ip="dhcp")]
        else:
            container.static = f"{subnet.static_address(50 + index)}/{subnet.prefix}"
            nets = [PveNet(name="eth0", ip=container.static, gw=subnet.gateway)]
        pct_setup(container.rootfs, hostname=container.name, nets=nets, nameserver=subnet.gateway,
                  searchdomain=DOMAIN)

    def config_lines(self, container: Container) -> list[str]:
        from tmplbuild.boot.proxmox import PveNet, lxc_config_lines

        net = PveNet(name="eth0", ip=container.static or "dhcp", gw=self.bridge.gateway if container.static else None)
        # Proxmox's keys (the bridge link standing for PVE's lxcnetaddbr hook, the id maps when unprivileged; no
        # `flags = up`: PVE sets none, the container's ifupdown raises eth0), plus the rootfs, which PVE keeps
        # in its own storage configuration.
        pve = lxc_config_lines(container.name, [net], self.bridge.link, unprivileged=self.unprivileged)
        return pve + [f"lxc.rootfs.path = dir:{container.rootfs}"]


class ProxmoxPrivileged(Proxmox):
    """The Proxmox profile for a privileged container (`pct create --unprivileged 0`): no id maps, and the
    privileged container's keys (tmplbuild.boot.proxmox.lxc_config_lines)."""

    name = "proxmox-privileged"
    letter = "q"
    unprivileged = False
    uid_offset = 0

    @classmethod
    def available(cls) -> str | None:
        return Lxc.available()

    @classmethod
    def unfit(cls, workdir: Path) -> str | None:
        return None


MANAGERS: dict[str, type[Manager]] = {m.name: m for m in (Nspawn, Lxc, LxcUnprivileged, Proxmox, ProxmoxPrivileged)}
