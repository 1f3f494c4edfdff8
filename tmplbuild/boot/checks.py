"""The checks `tmplbuild test` makes on two running containers of one template. Each returns a Check with the
evidence a maintainer needs to fix the template: the state, the failed units, the address, the answer."""
from __future__ import annotations

import re
import time
from dataclasses import dataclass

from tmplbuild.boot import emulation
from tmplbuild.boot.managers import Container
from tmplbuild.boot.netns import PROBE_IP, PROBE_NAME, TestNetwork
from tmplbuild.boot.relay import Plan
from tmplbuild.boot.rootfs import TemplateFacts

PASS, FAIL, SKIP = "pass", "fail", "skip"
DHCP_CLIENTS = ("dhclient", "systemd-networkd", "dhcpcd", "udhcpc", "NetworkManager", "connmand", "ifup")
BOOTING = ("initializing", "starting")
EMULATED_OFFER_WAIT = 15.0  # seconds an emulated client has to take an offer (natively it takes well under one)


@dataclass(frozen=True)
class Check:
    name: str
    status: str
    evidence: str

    def as_dict(self) -> dict[str, str]:
        return {"name": self.name, "status": self.status, "evidence": self.evidence}


def _join(parts: list[str]) -> str:
    return "; ".join(p for p in parts if p)


def boot(containers: list[Container], deadline: float) -> tuple[Check, dict[str, float | None]]:
    """`systemctl is-system-running --wait` = running before the deadline, for every container."""
    parts, ok, booted = [], True, {}
    for c in containers:
        while True:
            res = c.exec("systemctl", "is-system-running", "--wait", timeout=deadline - time.monotonic())
            # Right after start PID 1 has not opened its private bus yet: ask again until the deadline. systemd 252
            # says "Failed to connect to bus", 257 "Failed to connect to system scope bus via local transport";
            # earlier still (a slow start on a loaded host, PID 1 not yet systemd) systemctl answers "offline".
            early = "Failed to connect to" in res.out or res.out.strip().splitlines()[-1:] == ["offline"]
            if not early or time.monotonic() > deadline or not c.alive():
                break
            time.sleep(0.1)
        state = res.out.strip().splitlines()[-1] if res.out.strip() else f"no answer (exit {res.rc})"
        if res.rc == 124 or state in BOOTING:
            state = f"still {state if state in BOOTING else 'starting'} at the timeout"
        seconds = time.monotonic() - c.started
        booted[c.name] = seconds if state in ("running", "degraded") else None
        if state == "running":
            parts.append(f"{c.name} running after {seconds:.1f} s")
            continue
        failed = c.exec("systemctl", "list-units", "--failed", "--plain", "--no-legend", "--no-pager", timeout=10)
        units = [ln.split()[0] for ln in failed.out.splitlines() if ln.strip() and not ln.startswith(" ")]
        if c.emulated and state == "degraded" and units:
            blamed: dict[str, str] = {}
            for u in sorted(units, key=lambda u: u.endswith(".socket")):  # services first: a socket fails with its service
                if (why := emulation.blame(u, _last_log_line(c, u), blamed)) is not None:
                    blamed[u] = why
            if len(blamed) == len(units):
                parts.append(f"{c.name} degraded after {seconds:.1f} s only by what qemu-user cannot run: "
                             + "; ".join(f"{u}: {why}" for u, why in blamed.items()))
                continue
        ok = False
        parts.append(f"{c.name} {state}" + (f", failed units: {' '.join(units)}" if units else "")
                     + "".join(f" [{u}: {why}]" for u in units[:3] if (why := _last_log_line(c, u))))
    return Check("boot", PASS if ok else FAIL, _join(parts)), booted


def _last_log_line(c: Container, unit: str) -> str:
    """What a failed unit's own processes said last (its journal lines without PID 1's "Failed to start"),
    from the container's journal: the reason, not just the name."""
    res = c.exec("journalctl", "--no-pager", "-o", "cat", "-n", "1", f"_SYSTEMD_UNIT={unit}", timeout=10)
    lines = [ln.strip() for ln in res.out.splitlines() if ln.strip() and not ln.startswith("-- ")] if res.ok else []
    if not lines:
        # Nothing under the unit's own name (it failed before journald took its output, or its lines carry
        # another unit field): what `systemctl status` shows of it, its result and last lines, instead.
        res = c.exec("systemctl", "status", "--no-pager", "--lines", "3", "--", unit, timeout=10)
        lines = [ln.strip() for ln in res.out.splitlines()
                 if ln.strip().startswith(("Process:", "Main PID:")) or re.match(r"\s*\w{3} \d+ ", ln)]
    return " | ".join(lines[-3:])[:300] if lines else ""


def _ipv4(c: Container) -> tuple[list[str], str | None]:
    """The container's IPv4 addresses on its interface and its MAC, read with the host's `ip`."""
    res = c.host_exec("--net", "ip", "-o", "-4", "addr", "show", "dev", c.interface)
    addrs = re.findall(r"inet (\d+\.\d+\.\d+\.\d+/\d+)", res.out)
    link = c.host_exec("--net", "ip", "-o", "link", "show", "dev", c.interface)
    m = re.search(r"link/ether ([0-9a-f:]{17})", link.out)
    return addrs, m.group(1) if m else None


def network(containers: list[Container], net: TestNetwork, booted: dict[str, float | None],
            deadline: float, grace: float) -> Check:
    """An IPv4 lease from the test's DHCP server on the manager's interface (or, where the profile configured a
    static address, that address). Waits until the deadline, but no longer than `grace` after boot finished,
    and gives up at once when the booted container runs no DHCP client at all. Under qemu-user, a lease the
    emulator kept from the container (tmplbuild.boot.emulation.dhcp_blocked) is a SKIP naming why, and the
    container's dns and apt checks are skipped with it."""
    parts, ok, skipped = [], True, False
    for c in containers:
        offered: float | None = None
        while True:
            addrs, mac = _ipv4(c)
            lease = None if c.static or not mac else net.lease_for(mac)
            good = (c.static in addrs) if c.static else (lease is not None and any(a.split("/")[0] == lease for a in addrs))
            now, finished = time.monotonic(), booted.get(c.name)
            if good or now > deadline or not c.alive() or (finished is not None and now - c.started > finished + grace):
                break
            if not c.static and finished is not None and not _dhcp_client(c):
                break
            if c.emulated and mac and offered is None and net.offer_for(mac):
                offered = now
            if offered is not None and now - offered > EMULATED_OFFER_WAIT:
                break  # offered, and not taken: under qemu-user the reply never reaches the client
            time.sleep(0.2)
        if c.static:
            if good:
                parts.append(f"{c.name} {c.interface} {c.static} (static, as configured by the host)")
            else:
                ok = False
                parts.append(f"{c.name} {c.interface}: the static address {c.static} is not configured "
                             f"(has: {', '.join(addrs) or 'no IPv4 address'})")
            continue
        if good:
            parts.append(f"{c.name} {c.interface} {', '.join(addrs)} (DHCP lease for {mac})")
            continue
        if c.emulated and (why := emulation.dhcp_blocked(c, net, mac)):
            c.offline = why
            skipped = True
            parts.append(f"{c.name} {c.interface}: not possible under qemu-user: {why}")
            continue
        ok = False
        client = _dhcp_client(c)
        why = (f"no IPv4 lease (addresses: {', '.join(addrs) or 'none'})"
               + ("" if client else f"; no DHCP client running (looked for {', '.join(DHCP_CLIENTS)})"))
        parts.append(f"{c.name} {c.interface}: {why}")
    return Check("network", FAIL if not ok else SKIP if skipped else PASS, _join(parts))


def _dhcp_client(c: Container) -> str | None:
    running = set(c.processes())
    return next((name for name in DHCP_CLIENTS if name[:15] in running), None)


def dns(containers: list[Container], deadline: float) -> Check:
    """A name only the test's dnsmasq knows resolves inside the container (through whatever resolver the
    template configured from DHCP or the host)."""
    parts, ok, skipped = [], True, False
    for c in containers:
        if c.offline:
            skipped = True
            parts.append(f"{c.name}: not possible under qemu-user: it has no lease (see network)")
            continue
        while True:
            res = c.exec("getent", "ahostsv4", PROBE_NAME, timeout=10)
            if PROBE_IP in res.out or time.monotonic() > deadline or not c.alive():
                break
            time.sleep(0.5)
        if PROBE_IP in res.out:
            parts.append(f"{c.name} {PROBE_NAME} -> {PROBE_IP}")
            continue
        ok = False
        resolv = c.read("/etc/resolv.conf")
        servers = re.findall(r"^\s*nameserver\s+(\S+)", resolv or "", re.M)
        parts.append(f"{c.name}: {PROBE_NAME} does not resolve (getent exit {res.rc}); resolv.conf nameservers: "
                     f"{', '.join(servers) or ('none' if resolv is not None else 'no /etc/resolv.conf')}")
    return Check("dns", FAIL if not ok else SKIP if skipped else PASS, _join(parts))


def hostname(containers: list[Container]) -> Check:
    """The kernel hostname is the name the manager gave the container (not one baked into /etc/hostname)."""
    parts, ok = [], True
    for c in containers:
        res = c.host_exec("--uts", "uname", "-n")
        name = res.out.strip()
        if name == c.name:
            parts.append(f"{c.name}: hostname {name}")
        else:
            ok = False
            baked = (c.read("/etc/hostname") or "").strip()
            parts.append(f"{c.name}: hostname is {name!r}, expected {c.name!r}"
                         + (f" (/etc/hostname says {baked!r})" if baked else ""))
    return Check("hostname", PASS if ok else FAIL, _join(parts))


def hosts(containers: list[Container]) -> Check:
    """`getent hosts localhost` and `getent hosts $(hostname)` answer (sudo, mail and many daemons need both)."""
    parts, ok = [], True
    for c in containers:
        for name in ("localhost", c.name):
            res = c.exec("getent", "hosts", name, timeout=10)
            if res.ok and res.out.strip():
                parts.append(f"{c.name}: {name} -> {res.out.split()[0]}")
            else:
                ok = False
                has = c.read("/etc/hosts")
                parts.append(f"{c.name}: getent hosts {name} found nothing (exit {res.rc})"
                             + ("; no /etc/hosts" if has is None else ""))
    return Check("hosts", PASS if ok else FAIL, _join(parts))


def machine_id(containers: list[Container], facts: TemplateFacts) -> Check:
    """/etc/machine-id is a fresh, valid id in every container, and differs between containers."""
    ids = {c.name: (c.read("/etc/machine-id") or "").strip() for c in containers}
    problems = []
    for name, mid in ids.items():
        if not re.fullmatch(r"[0-9a-f]{32}", mid):
            problems.append(f"{name}: machine-id is {mid!r}, expected 32 hex digits")
        elif facts.machine_id and mid == facts.machine_id:
            problems.append(f"{name}: machine-id {mid} is the one the template ships")
    if not problems and len(set(ids.values())) != len(ids):
        problems.append(f"two containers share machine-id {next(iter(ids.values()))}")
    if problems:
        return Check("machine-id", FAIL, _join(problems))
    return Check("machine-id", PASS, _join([f"{n}: {m}" for n, m in ids.items()]))


def apt(c: Container, facts: TemplateFacts, plan: Plan | None, timeout: float) -> Check:
    """`apt-get update` against the mirror the template's sources name (through the relay)."""
    if plan is None:
        return Check("apt", SKIP, "no mirror given: pass --apt-mirror named (relay to the mirror the template "
                                  "names) or --apt-mirror URL (a local mirror fixture)")
    if not facts.sources:
        return Check("apt", FAIL, "the template names no apt source")
    if plan.refused:
        return Check("apt", FAIL, "unreachable from a container: " + "; ".join(plan.refused))
    if c.offline:
        return Check("apt", SKIP, f"{c.name}: not possible under qemu-user: it has no lease (see network)")
    res = c.exec("apt-get", "update", "-q", timeout=timeout)
    bad = [ln.strip() for ln in res.out.splitlines() if re.match(r"^(E:|W:|Err:)", ln.strip())]
    if res.ok and not bad:
        hits = len([ln for ln in res.out.splitlines() if re.match(r"^(Get|Hit):", ln)])
        return Check("apt", PASS, f"{c.name}: apt-get update fetched {hits} indices from "
                                  f"{', '.join(sorted({u for u, _ in facts.sources}))}")
    detail = bad[0] if bad else res.out.strip().splitlines()[-1] if res.out.strip() else "no output"
    return Check("apt", FAIL, f"{c.name}: apt-get update exit {res.rc}: {detail[:300]}")


def _listening(c: Container, port: int) -> bool:
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        res = c.host_exec("--net", "cat", table)
        for line in res.out.splitlines()[1:]:
            fields = line.split()
            if len(fields) > 3 and fields[3] == "0A" and fields[1].rsplit(":", 1)[-1] == f"{port:04X}":
                return True
    return False


def sshd(containers: list[Container], facts: TemplateFacts, deadline: float) -> list[Check]:
    """For templates that ship sshd: it listens on 22, and every container has its own host keys."""
    if not facts.has_sshd:
        return [Check("sshd", SKIP, "the template ships no sshd"), Check("host-keys", SKIP, "the template ships no sshd")]
    parts, ok = [], True
    for c in containers:
        while not (listening := _listening(c, 22)) and time.monotonic() < deadline and c.alive():
            time.sleep(0.3)
        parts.append(f"{c.name}: {'listening on port 22' if listening else 'nothing listens on port 22'}")
        ok = ok and listening
    listen = Check("sshd", PASS if ok else FAIL, _join(parts))
    keys: dict[str, dict[str, str]] = {}
    for c in containers:
        res = c.exec("sh", "-c", "for f in /etc/ssh/ssh_host_*_key.pub; do [ -f \"$f\" ] && echo \"$f $(cat \"$f\")\"; done",
                     timeout=10)
        keys[c.name] = {ln.split()[0]: " ".join(ln.split()[1:3]) for ln in res.out.splitlines() if len(ln.split()) >= 3}
    problems = [f"{n}: no host keys in /etc/ssh" for n, k in keys.items() if not k]
    names = list(keys)
    if not problems and len(names) == 2:
        shared = [f for f in keys[names[0]] if keys[names[0]][f] == keys[names[1]].get(f)]
        if shared:
            problems.append(f"{names[0]} and {names[1]} share host keys: {', '.join(shared)}")
    if problems:
        return [listen, Check("host-keys", FAIL, _join(problems))]
    return [listen, Check("host-keys", PASS, _join([f"{n}: {len(k)} host keys of its own" for n, k in keys.items()]))]
