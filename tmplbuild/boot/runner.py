"""`tmplbuild test`: boot a template in throwaway containers under each manager, run the checks, clean up.

Everything it creates (a work directory, a network namespace with its links and dnsmasq, the relay, containers
and their mounts and processes) is registered for removal the moment it exists, and removed on success,
failure, Ctrl-C and SIGTERM alike."""
from __future__ import annotations

import contextlib
import dataclasses
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from tmplbuild import foreign
from tmplbuild.boot import checks, emulation
from tmplbuild.boot.checks import FAIL, PASS, SKIP, Check
from tmplbuild.boot.managers import MANAGERS, Container, Manager, forget_cgroups, forget_lxc_cgroups, forget_lxc_locks
from tmplbuild.boot.netns import TestNetwork
from tmplbuild.boot.relay import Plan, Relay, plan_routes
from tmplbuild.boot.rootfs import SharedUnpack, TemplateFacts, decompressor, read_facts
from tmplbuild.errors import EnvironmentUnfitError, LocalIOError, UsageError
from tmplbuild.log import say
from tmplbuild.run import run

TMPFS_SOURCE = "tmplbuild-test"
ALL = ("nspawn", "lxc", "lxc-unprivileged", "proxmox", "proxmox-privileged")


@dataclass
class TestOptions:
    managers: list[str]                   # names from ALL; "all" expanded by the caller (see resolve_managers)
    explicit: bool = False                # the user named them: unavailable is an error, not a skip
    timeout: float = 60.0                 # per manager: boot, checks and shutdown of its two containers
    grace: float = 20.0                   # how long to wait for a DHCP lease after boot finished
    apt_mirror: str | None = None         # None (apt check skipped), "named", or a mirror fixture URL
    apt_timeout: float = 120.0
    workdir: Path | None = None           # parent of the throwaway work directory (default /var/tmp)
    tmpfs: bool = True                    # the containers' trees on a tmpfs of their own (else on disk)
    jobs: int = 0                         # managers run side by side at most (0: default_jobs)


@dataclass
class ManagerReport:
    manager: str
    version: str = ""
    status: str = SKIP
    reason: str = ""
    containers: list[str] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    seconds: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)  # unpack, boot, checks, shutdown: where the time went

    def as_dict(self) -> dict[str, object]:
        return {"manager": self.manager, "version": self.version, "status": self.status, "reason": self.reason,
                "containers": self.containers, "seconds": round(self.seconds, 1),
                "phases": {k: round(v, 2) for k, v in self.phases.items()},
                "checks": [c.as_dict() for c in self.checks]}


@dataclass
class Report:
    artifact: str
    template: dict[str, str]
    managers: list[ManagerReport]
    seconds: float

    @property
    def failed(self) -> list[ManagerReport]:
        return [m for m in self.managers if m.status == FAIL]

    @property
    def status(self) -> str:
        if self.failed:
            return FAIL
        return PASS if any(m.status == PASS for m in self.managers) else SKIP

    def as_dict(self) -> dict[str, object]:
        return {"artifact": self.artifact, "template": self.template, "status": self.status,
                "seconds": round(self.seconds, 1), "managers": [m.as_dict() for m in self.managers]}


def resolve_managers(names: list[str]) -> tuple[list[str], bool]:
    """--manager values (repeatable, comma lists, `all`) → (ordered names, whether the user named them)."""
    wanted: list[str] = []
    for value in names or ["all"]:
        for name in value.split(","):
            name = name.strip()
            if name == "all":
                wanted += [n for n in ALL if n not in wanted]
            elif name in MANAGERS:
                if name not in wanted:
                    wanted.append(name)
            else:
                raise UsageError("--manager", f"found {name!r}, expected one of {', '.join(ALL)} or all")
    explicit = bool(names) and all("all" not in v.split(",") for v in names)
    return wanted, explicit


def test_artifact(artifact: Path, opts: TestOptions) -> Report:
    """Boot `artifact` under each manager in opts and run every check. Raises UsageError (bad artifact or
    options) and EnvironmentUnfitError (not root, a named manager missing); failed checks are in the report."""
    if not artifact.is_file():
        raise UsageError("artifact", f"{artifact}: no such file")
    decompressor(artifact)
    if os.geteuid() != 0:
        raise EnvironmentUnfitError("test", "booting containers needs root (systemd-nspawn, lxc-start, network namespaces)")
    for tool in ("nsenter", "unshare", "ip", "dnsmasq"):
        if not shutil.which(tool):
            pkg = {"dnsmasq": "dnsmasq-base", "ip": "iproute2"}.get(tool, "util-linux")
            raise EnvironmentUnfitError("test", f"{tool} is not installed (apt-get install {pkg})")
    start = time.monotonic()
    reports: list[ManagerReport] = []
    runnable: list[type[Manager]] = []
    for name in opts.managers:
        cls = MANAGERS[name]
        why = cls.available()
        if why and opts.explicit:
            raise EnvironmentUnfitError(f"test {name}", why)
        if why:
            reports.append(ManagerReport(manager=name, status=SKIP, reason=why))
        else:
            runnable.append(cls)
    parent = opts.workdir or Path("/var/tmp")
    if not parent.is_dir():
        raise UsageError("--work-dir", f"{parent}: no such directory")
    reap_stale(parent)
    with contextlib.ExitStack() as stack:
        workdir = Path(tempfile.mkdtemp(prefix=f"tmplbuild-test.{os.getpid()}.", dir=parent))
        stack.callback(shutil.rmtree, workdir, ignore_errors=True)
        if opts.tmpfs:
            # The containers' trees live in memory: unpacking two 160 MB trees per manager onto this machine's
            # disk took 7 s to minutes, on a tmpfs 0.4 s. Not /dev/shm: it is nosuid,nodev, and su or ping
            # would break inside. Unmounted on the way out; a SIGKILLed run's mount is reaped by the next.
            run(["mount", "-t", "tmpfs", "-o", "mode=0711,size=75%", TMPFS_SOURCE, str(workdir)], check="work dir",
                capture=True, error=LocalIOError)
            stack.callback(_umount, workdir)
        workdir.chmod(0o711)  # an unprivileged container's root (uid 100000 here) must reach its rootfs
        fit: list[type[Manager]] = []
        for cls in runnable:
            why = cls.unfit(workdir)
            if why and opts.explicit:
                raise EnvironmentUnfitError(f"test {cls.name}", why)
            if why:
                reports.append(ManagerReport(manager=cls.name, version=cls.version(), status=SKIP, reason=why))
                say(f"==> {cls.name}: skipped: {why}")
            else:
                fit.append(cls)
        uses: dict[int, int] = {}
        for cls in fit:
            uses[cls.uid_offset] = uses.get(cls.uid_offset, 0) + 2  # two containers each
        trees = SharedUnpack(artifact, workdir, uses)
        # What the checks compare against, read from the tree the containers are copied from (the first one
        # unpacked: a template tar that does not unpack stops the run here, before any network exists).
        facts = read_facts(trees.tree(0 if 0 in uses or not uses else next(iter(uses))))
        emulated = bool(facts.arch) and foreign.is_foreign(facts.arch or "")
        if emulated and fit:
            why = foreign.boot_problem(facts.arch or "")
            if why and opts.explicit:
                raise EnvironmentUnfitError("test", why)
            if why:
                for cls in fit:
                    reports.append(ManagerReport(manager=cls.name, version=cls.version(), status=SKIP, reason=why))
                say(f"==> every manager skipped: {why}")
                fit = []
            else:
                emu = foreign.emulator(facts.arch or "")
                say(f"==> {facts.arch} template: booted under qemu-user ({emu.interpreter if emu else '?'}), "
                    f"deadlines x{emulation.SLOWDOWN:g}, credential drop-ins in each container's copy")
                opts = dataclasses.replace(opts, timeout=opts.timeout * emulation.SLOWDOWN,
                                           grace=opts.grace * emulation.SLOWDOWN,
                                           apt_timeout=opts.apt_timeout * emulation.SLOWDOWN)
        template = {"file": artifact.name, **{k: v for k, v in facts.os_release.items() if k in ("PRETTY_NAME", "VERSION_ID")}}
        net = TestNetwork.create(workdir)
        stack.callback(net.close)
        plan: Plan | None = None
        if opts.apt_mirror:
            plan = plan_routes(facts.sources)
            relay = Relay(net.name, plan, opts.apt_mirror, workdir / "relay.log")
            stack.callback(relay.close)
        net.start_dnsmasq(plan.hosts if plan else [])
        tag = secrets.token_hex(3)
        jobs: list[tuple[Manager, ManagerReport]] = []
        for cls in fit:
            report = ManagerReport(manager=cls.name, version=cls.version())
            reports.append(report)
            mgr = cls(net, workdir)
            stack.callback(mgr.close)  # after every manager's containers are gone (LXC's share a lock directory)
            report.version = mgr.describe()
            jobs.append((mgr, report))
        _run_managers(jobs, trees, facts, plan, opts, tag, emulated)
    order = {n: i for i, n in enumerate(opts.managers)}
    reports.sort(key=lambda r: order.get(r.manager, 99))
    return Report(artifact=str(artifact), template=template, managers=reports, seconds=time.monotonic() - start)


def _umount(path: Path) -> None:
    subprocess.run(["umount", "--lazy", str(path)], capture_output=True)


def reap_stale(parent: Path) -> None:
    """Remove what a run that was SIGKILLed left behind (the one signal it cannot clean up after): its network
    namespace and any process still in it, its tmpfs and its work directory. A run is recognised by the pid in
    the names; only runs whose process is gone are touched."""
    def gone(pid: str) -> bool:
        return pid.isdigit() and not Path(f"/proc/{pid}").exists()

    for ns in Path("/run/netns").glob("tmplbuild-test-*") if Path("/run/netns").is_dir() else []:
        parts = ns.name.split("-")
        if len(parts) >= 4 and gone(parts[2]):
            net = TestNetwork(name=ns.name, workdir=parent)
            net.close()
    for d in parent.glob("tmplbuild-test.*"):
        parts = d.name.split(".")
        if len(parts) >= 3 and gone(parts[1]) and d.is_dir() and not d.is_symlink():
            kill_leaders(d)  # containers outlive their manager's process (nspawn, an LXC monitor) killed with the run
            lxc = d / "lxc"
            names = [c.name for c in lxc.iterdir()] if lxc.is_dir() and not lxc.is_symlink() else []
            _umount(d)
            shutil.rmtree(d, ignore_errors=True)
            forget_lxc_locks(lxc)
            forget_lxc_cgroups(names)
    forget_cgroups(gone)


LEADERS = "leaders"  # in the work directory: "PID STARTTIME" of each container's PID 1, for reap_stale


def _start_time(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def record_leader(workdir: Path, c: Container) -> None:
    if c.leader is not None and (start := _start_time(c.leader)):
        with open(workdir / LEADERS, "a") as f:
            f.write(f"{c.leader} {start}\n")


def kill_leaders(workdir: Path) -> None:
    """SIGKILL the PID 1 of every container a run recorded that still runs (same pid and start time, so never
    a process that reused the pid): the rest of its PID namespace goes with it."""
    try:
        lines = (workdir / LEADERS).read_text().splitlines()
    except OSError:
        return
    for line in lines:
        pid, _, start = line.partition(" ")
        if pid.isdigit() and start and _start_time(int(pid)) == start:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)


def default_jobs(managers: int) -> int:
    """Managers side by side by default: one more than the cores, since each run also waits (for a lease, for
    its containers to power off) and leaves a core free then. bench/gate.py measured 1, 2, 3 and all 5 here."""
    return max(1, min(managers, (os.cpu_count() or 1) + 1))


class _Cancelled(Exception):
    """The run was interrupted: a manager's thread stops at its next step."""


class _Runs:
    """The managers' runs, side by side, and what stopping them all at once needs: every container started."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.cancelled = False
        self.started: list[tuple[Manager, Container]] = []

    def check(self) -> None:
        if self.cancelled:
            raise _Cancelled("interrupted")

    def start(self, mgr: Manager, c: Container) -> None:
        with self.lock:
            self.check()
            self.started.append((mgr, c))
        mgr.start(c)
        with self.lock:
            if self.cancelled:  # cancel() ran while this one was starting: it may have found nothing to kill
                mgr.kill(c)
                raise _Cancelled("interrupted")

    def cancel(self) -> None:
        """Kill every container any manager started (each thread's own clean-up then forgets and removes it)."""
        with self.lock:
            self.cancelled = True
            started = list(self.started)
        for mgr, c in started:
            with contextlib.suppress(Exception):
                mgr.kill(c)


def _run_managers(jobs: list[tuple[Manager, ManagerReport]], trees: SharedUnpack, facts: TemplateFacts,
                  plan: Plan | None, opts: TestOptions, tag: str, emulated: bool = False) -> None:
    """Every manager's run in a thread of its own, at most opts.jobs at a time (0: default_jobs). Their containers
    boot side by side in the one test network; each run's steps and checks are those it has alone. Ctrl-C or
    SIGTERM in the caller's thread kills every container, waits for the threads' clean-up and re-raises."""
    if not jobs:
        return
    runs = _Runs()
    slots = threading.BoundedSemaphore(opts.jobs if opts.jobs > 0 else default_jobs(len(jobs)))
    errors: list[BaseException] = []

    def one(mgr: Manager, report: ManagerReport) -> None:
        slots.acquire()
        held = [True]

        def release() -> None:  # once its containers only shut down, the next manager may start
            if held:
                held.clear()
                slots.release()

        try:
            if runs.cancelled:
                return
            say(f"==> {mgr.name} ({report.version})")
            _run_manager(mgr, trees, facts, plan, opts, report, tag, runs, release, emulated)
            say(f"    {mgr.name}: {report.status} in {report.seconds:.1f}s")
        except BaseException as exc:  # noqa: BLE001 - EnvironmentUnfitError: the caller raises it
            errors.append(exc)
            runs.cancel()
        finally:
            release()

    # The Proxmox profiles first: their containers take longest to power off (ifupdown releases the lease), and
    # that wait then overlaps the other managers' work instead of ending the run.
    threads = [threading.Thread(target=one, args=job, name=f"test {job[0].name}", daemon=True)
               for job in reversed(jobs)]
    for t in threads:
        t.start()
    try:
        for t in threads:
            t.join()
    except BaseException:
        runs.cancel()
        for t in threads:
            t.join(60)
        raise
    if errors:
        raise next((e for e in errors if not isinstance(e, _Cancelled)), errors[0])


def _run_manager(mgr: Manager, trees: SharedUnpack, facts: TemplateFacts, plan: Plan | None, opts: TestOptions,
                 report: ManagerReport, tag: str, runs: _Runs, shutting_down=lambda: None,
                 emulated: bool = False) -> None:
    start = time.monotonic()
    containers = [Container(name=f"tb{tag}{mgr.letter}{i}", rootfs=mgr.workdir / f"{mgr.name}-{i}" / "rootfs",
                            interface=mgr.interface, log=mgr.workdir / f"{mgr.name}-{i}.log", emulated=emulated)
                  for i in (1, 2)]
    report.containers = [c.name for c in containers]
    try:
        def prepare(i: int) -> None:
            c = containers[i]
            c.rootfs.parent.mkdir()
            trees.copy(c.rootfs, mgr.uid_offset, log=c.log)
            if emulated:
                emulation.write_dropins(c.rootfs, mgr.uid_offset)
            mgr.prepare(c, i)

        _at_once(prepare, range(len(containers)))
        mark = time.monotonic()
        report.phases["unpack"] = mark - start
        deadline = time.monotonic() + opts.timeout
        for c in containers:
            c.started = time.monotonic()
            runs.start(mgr, c)
            record_leader(mgr.workdir, c)
        boot, booted = checks.boot(containers, deadline)
        runs.check()
        report.checks.append(boot)
        report.phases["boot"] = time.monotonic() - mark
        mark = time.monotonic()
        report.checks.append(checks.network(containers, mgr.net, booted, deadline, opts.grace))
        # Right after a lease the resolver may still be being configured; without one there is nothing to wait for.
        dns_wait = 5.0 if report.checks[-1].status == PASS else 0.0
        report.checks.append(checks.dns(containers, min(deadline, time.monotonic() + dns_wait)))
        report.checks.append(checks.hostname(containers))
        report.checks.append(checks.hosts(containers))
        report.checks.append(checks.machine_id(containers, facts))
        report.checks.append(checks.apt(containers[0], facts, plan, opts.apt_timeout))
        report.checks += checks.sshd(containers, facts, min(deadline, time.monotonic() + 10))
        report.phases["checks"] = time.monotonic() - mark
        runs.check()
        shutting_down()
        mark = time.monotonic()
        report.checks.append(_shutdown(mgr, containers, max(deadline - time.monotonic(), 10.0)))
        report.phases["shutdown"] = time.monotonic() - mark
    except (EnvironmentUnfitError, _Cancelled):
        raise
    except Exception as exc:  # noqa: BLE001 - a container that cannot even start is this manager's failure
        report.checks.append(Check("start", FAIL, str(exc)))
    finally:
        for c in containers:
            if not c.stopped:
                mgr.kill(c)
            mgr.forget(c)
            if not c.alive():  # never remove a tree a container still runs on
                shutil.rmtree(c.rootfs.parent, ignore_errors=True)
        report.seconds = time.monotonic() - start
    report.status = FAIL if any(c.status == FAIL for c in report.checks) else PASS


def _shutdown(mgr: Manager, containers: list[Container], timeout: float) -> Check:
    results: dict[str, tuple[bool, float]] = {}

    def stop(c: Container) -> None:
        results[c.name] = mgr.poweroff(c, timeout)

    _at_once(stop, containers)
    parts = [f"{n}: {'powered off' if ok else 'still running'} after {s:.1f} s" for n, (ok, s) in results.items()]
    ok = all(ok for ok, _ in results.values())
    return Check("shutdown", PASS if ok else FAIL, "; ".join(parts) + ("" if ok else f" (timeout {timeout:.0f} s)"))


def _at_once(fn, items) -> None:
    """fn(item) for every item, each in a thread of its own; the first exception is raised here."""
    errors: list[BaseException] = []

    def call(item: object) -> None:
        try:
            fn(item)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            errors.append(exc)

    threads = [threading.Thread(target=call, args=(item,)) for item in items]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def render(report: Report) -> str:
    lines = [f"template {report.artifact}" + (f" ({report.template['PRETTY_NAME']})" if "PRETTY_NAME" in report.template else "")]
    for m in report.managers:
        if m.status == SKIP and not m.checks:
            lines.append(f"== {m.manager}: SKIPPED: {m.reason}")
            continue
        lines.append(f"== {m.manager} ({m.version}), containers {', '.join(m.containers)}")
        for c in m.checks:
            lines.append(f"   {c.status.upper():4}  {c.name:10}  {c.evidence}")
        counts = {s: sum(1 for c in m.checks if c.status == s) for s in (PASS, FAIL, SKIP)}
        lines.append(f"   {m.manager}: {counts[PASS]} passed, {counts[FAIL]} failed, {counts[SKIP]} skipped "
                     f"in {m.seconds:.1f} s")
    tested = [m for m in report.managers if m.checks]
    skipped = [m.manager for m in report.managers if not m.checks]
    verdict = "FAIL" if report.failed else "PASS" if tested else "NOTHING TESTED"
    lines.append(f"result: {verdict} ({len(tested)} managers tested"
                 + (f", failed: {', '.join(m.manager for m in report.failed)}" if report.failed else "")
                 + (f", skipped: {', '.join(skipped)}" if skipped else "") + f") in {report.seconds:.1f} s")
    return "\n".join(lines)
