"""The test's own network: a network namespace that the test creates and deletes, a bridge for LXC, the veth
ends systemd-nspawn makes, and dnsmasq answering DHCP and DNS on them. Nothing of it reaches the host's
network: the namespace has no route out, and deleting it removes every link in it."""
from __future__ import annotations

import ipaddress
import os
import re
import secrets
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from tmplbuild.errors import EnvironmentUnfitError, LocalIOError
from tmplbuild.run import CLEAN_ENV, run

WRAPPER = Path(__file__).with_name("netns-exec.sh")
# Private addresses inside the test's own namespace only; they never leave it.
NET = ipaddress.ip_network("10.213.0.0/16")
SERVICE_IP = "10.213.255.254"          # dnsmasq's DNS answers and the apt relay listen here (on lo)
DOMAIN = "tmplbuild.test"              # RFC 6761: reserved for testing
PROBE_NAME = f"dns-probe.{DOMAIN}"      # the name the DNS check resolves
PROBE_IP = "10.213.255.253"


@dataclass
class Subnet:
    link: str
    index: int

    @property
    def gateway(self) -> str:
        return f"10.213.{self.index}.1"

    @property
    def prefix(self) -> int:
        return 24

    def static_address(self, host: int) -> str:
        return f"10.213.{self.index}.{host}"

    def contains(self, address: str) -> bool:
        return ipaddress.ip_address(address) in ipaddress.ip_network(f"10.213.{self.index}.0/24")


@dataclass
class TestNetwork:
    """Create with `TestNetwork.create(workdir)`; always `close()` (the runner's ExitStack does)."""

    name: str
    workdir: Path
    subnets: list[Subnet] = field(default_factory=list)
    dnsmasq: subprocess.Popen[bytes] | None = None
    relay_hosts: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)  # managers add links side by side

    @classmethod
    def create(cls, workdir: Path) -> "TestNetwork":
        if not Path("/run/netns").exists():
            Path("/run/netns").mkdir(parents=True, exist_ok=True)
        name = f"tmplbuild-test-{os.getpid()}-{secrets.token_hex(3)}"
        run(["ip", "netns", "add", name], check="test network", capture=True, error=EnvironmentUnfitError)
        net = cls(name=name, workdir=workdir)
        try:
            net.ip("link", "set", "lo", "up")
            net.ip("addr", "add", f"{SERVICE_IP}/32", "dev", "lo")
            net.ip("addr", "add", f"{PROBE_IP}/32", "dev", "lo")
        except BaseException:
            net.close()
            raise
        return net

    def ip(self, *args: str) -> None:
        run(["ip", "-n", self.name, *args], check="test network", capture=True, error=LocalIOError)

    def argv(self, *argv: str) -> list[str]:
        """argv that runs inside the namespace with a matching /sys (see netns-exec.sh)."""
        return ["sh", str(WRAPPER), self.name, *argv]

    def nsenter(self, *argv: str) -> list[str]:
        """argv that only switches to the namespace (enough for clients: ssh-keyscan, lxc-info)."""
        return ["nsenter", f"--net=/run/netns/{self.name}", *argv]

    def add_bridge(self, prefix: str) -> Subnet:
        """A new bridge named prefix + its subnet's number, with the subnet's gateway address."""
        with self.lock:
            subnet = Subnet(f"{prefix}{len(self.subnets) + 1}", len(self.subnets) + 1)
            self.ip("link", "add", subnet.link, "type", "bridge")
            self._address(subnet)
            self.subnets.append(subnet)
        return subnet

    def adopt_link(self, link: str, wait: float = 10.0) -> Subnet:
        """Give a link that a manager created in the namespace (nspawn's `ve-NAME`) an address, as
        systemd-networkd's 80-container-ve.network does on a host, so dnsmasq serves DHCP on it."""
        deadline = time.monotonic() + wait
        while not self._has_link(link):
            if time.monotonic() > deadline:
                raise LocalIOError("test network", f"{link} did not appear in {self.name} within {wait:.0f} s")
            time.sleep(0.05)
        with self.lock:
            subnet = Subnet(link, len(self.subnets) + 1)
            self._address(subnet)
            self.subnets.append(subnet)
        return subnet

    def _has_link(self, link: str) -> bool:
        return subprocess.run(["ip", "-n", self.name, "link", "show", link], capture_output=True).returncode == 0

    def _address(self, subnet: Subnet) -> None:
        self.ip("addr", "add", f"{subnet.gateway}/{subnet.prefix}", "dev", subnet.link)
        self.ip("link", "set", subnet.link, "up")

    @property
    def leases_file(self) -> Path:
        return self.workdir / "dnsmasq.leases"

    def start_dnsmasq(self, relay_hosts: list[str]) -> None:
        """DHCP on every subnet (present and future: --bind-dynamic), DNS for PROBE_NAME and, when apt is
        relayed, the archive hosts the template's sources name, pointed at the relay. Nothing else resolves."""
        self.relay_hosts = relay_hosts
        ranges = [f"--dhcp-range=10.213.{i}.100,10.213.{i}.199,255.255.255.0,1h" for i in range(1, 33)]
        argv = [
            "dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv", "--no-hosts",
            "--user=root", "--group=root", "--bind-dynamic", "--interface=ve-*", "--interface=tb*",
            f"--dhcp-leasefile={self.leases_file}", f"--pid-file={self.workdir / 'dnsmasq.pid'}",
            f"--log-facility={self.workdir / 'dnsmasq.log'}", "--log-dhcp", "--log-queries",
            f"--domain={DOMAIN}", f"--local=/{DOMAIN}/", f"--host-record={PROBE_NAME},{PROBE_IP}",
            "--dhcp-authoritative", "--no-ping", "--dhcp-option=option:dns-server,0.0.0.0",
            *ranges,
            *(f"--address=/{host}/{SERVICE_IP}" for host in relay_hosts),
        ]
        self.dnsmasq = subprocess.Popen(self.argv(*argv), env=CLEAN_ENV, stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                        start_new_session=True)
        time.sleep(0.2)
        if self.dnsmasq.poll() is not None:
            err = self.dnsmasq.stderr.read().decode(errors="replace").strip() if self.dnsmasq.stderr else ""
            raise EnvironmentUnfitError("test network", f"dnsmasq did not start: {err or 'exit ' + str(self.dnsmasq.returncode)}")

    def lease_for(self, mac: str) -> str | None:
        """The IPv4 address dnsmasq leased to `mac`, or None."""
        try:
            text = self.leases_file.read_text()
        except OSError:
            return None
        for line in text.splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[1].lower() == mac.lower():
                return parts[2]
        return None

    def offer_for(self, mac: str) -> str | None:
        """The address dnsmasq offered `mac` (its log, --log-dhcp), or None: the client asked and was answered."""
        try:
            text = (self.workdir / "dnsmasq.log").read_text(errors="replace")
        except OSError:
            return None
        found = re.findall(r"DHCPOFFER\([^)]*\) (\d+\.\d+\.\d+\.\d+) " + re.escape(mac), text, re.IGNORECASE)
        return found[-1] if found else None

    def processes(self) -> list[int]:
        out = subprocess.run(["ip", "netns", "pids", self.name], capture_output=True).stdout.decode()
        return [int(p) for p in out.split()]

    def close(self) -> None:
        """Stop dnsmasq and anything else left in the namespace, then delete it (and every link in it)."""
        if self.dnsmasq is not None and self.dnsmasq.poll() is None:
            try:
                os.killpg(self.dnsmasq.pid, signal.SIGTERM)
                self.dnsmasq.wait(5)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(self.dnsmasq.pid, signal.SIGKILL)
                self.dnsmasq.wait()
        for pid in self.processes():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)
