"""An emulation of what Proxmox VE's `pct create` and `pct start` write into a Debian container's root
filesystem, and of the LXC keys Proxmox generates for it, so that `tmplbuild test` can boot a template under
plain LXC the way a Proxmox node would configure it. It is an emulation, a port of the Perl to Python:
pct itself is not run (it is not installed here, and cannot be), and nothing here talks to Proxmox.

What it ports, from proxmox/pve-container (read in the stored copies named by commit):

* src/PVE/LXC/Setup/Debian.pm @ 04d6c0e0ba96015c6eb8bb9d43ee8cd1a7da5115: ``new`` (/etc/debian_version,
  the testing-name map), ``setup_init`` (container getty and systemd presets when /sbin/init is systemd,
  ``setup_inittab``), ``snakeoil_fixup``, ``setup_network`` with ``remove_gateway_scripts`` and
  ``make_gateway_scripts``: emulates PVE::LXC::Setup::Debian::setup_network as of that commit, byte for byte
  for IPv4 (``auto IF`` + ``iface IF inet dhcp``, or ``inet static`` with ``address A/N`` since Debian 10 and
  ``gateway G``, or ``post-up``/``pre-down`` route scripts between ``# --- BEGIN PVE ---`` and
  ``# --- END PVE ---`` when the gateway lies outside the subnet; every line PVE does not own is kept where it
  was, sections of interfaces it manages are rewritten in place, the loopback is added when no ``auto lo``).
* src/PVE/LXC/Setup/Base.pm @ f4e79dbe82a0d0174ccf8bd1f97740e194b1ff6d: ``post_create_hook`` and
  ``pre_start_hook`` (the order of the steps), ``clear_machine_id``, ``set_hostname`` and ``update_etc_hosts``
  (the marked section in /etc/hosts with the localhost lines and ``127.0.1.1 NAME`` or ``IP FQDN NAME``),
  ``set_dns`` and ``lookup_dns_conf`` (the marked section that replaces /etc/resolv.conf),
  ``setup_container_getty_service``, ``setup_systemd_preset`` (/etc/systemd/system-preset/00-pve.preset),
  ``ct_modify_file``, ``remove_pve_sections``, ``ct_is_file_ignored`` (``.pve-ignore.NAME`` files).
* src/PVE/LXC/Setup.pm @ f4e79dbe: every step runs in ``protected_call``, a fork that chroot()s into the
  rootfs. So absolute symlinks in the tree resolve inside the tree, never on the host.
* src/PVE/LXC.pm @ f4e79dbe: ``update_lxc_config``, ``make_apparmor_config``, ``get_primary_ips`` (the
  address in /etc/hosts comes from net0); src/PVE/LXC/Config.pm: ``get_tty_count`` (default tty=2),
  ``has_dev_console`` (default: a console).
* pve-common src/PVE/Tools.pm ``file_set_contents`` (what every write goes through: ``NAME.tmp.PID`` then
  rename(), mode 0644), ``split_list``; src/PVE/INotify.pm ``read_etc_resolv_conf`` (the host's DNS, used
  when the container has no nameserver or searchdomain of its own).

Symlinks: PVE reads through a symlink (inside the chroot) and then renames its new file over the link, so a
symlinked /etc/resolv.conf (systemd-resolved's ../run/systemd/resolve/stub-resolv.conf, or any absolute link)
becomes a regular file holding PVE's section; when the link dangles inside the container (nothing is mounted
on /run at create time) PVE sees no file and writes its section alone. This module does the same with the
rootfs as the root: every path is resolved component by component with ``..`` and absolute links clamped to
the rootfs (chroot semantics), nothing is ever read or written outside it, and writes go to a temporary file in
the resolved directory and os.replace() over the name (atomic, mode 0644). New files and links take the owner
of the rootfs directory when run as root (PVE's ``ct_reset_ownership`` chowns to the container's root).

Left out, on purpose: the root password (``set_user_password``: date-stamped /etc/shadow, no password is
given here), new SSH host keys (``rewrite_ssh_host_keys`` runs ssh-keygen), ``randomize_crontab`` (random
minutes: not reproducible), ``set_timezone`` (a no-op unless --timezone is given), IPv6 (``ip6``/``gw6``; the
interface here is IPv4 only), the CPU architecture emulator and arch detection, and Debian's
``template_fixup`` (Debian inherits Base's, which does nothing).
"""
from __future__ import annotations

import ipaddress
import os
import re
import stat
from collections import deque
from dataclasses import dataclass
from pathlib import Path

PVE_HEAD = "# --- BEGIN PVE ---\n"
PVE_TAIL = "# --- END PVE ---\n"
PVE_TTY_COUNT = 2                      # PVE::LXC::Config tty default
PVE_MAX_NETS = 32                      # net0 .. net31
LXC_CONFIG_DIR = "/usr/share/lxc/config"
UNPRIVILEGED_BASE = 100000             # update_lxc_config: lxc.idmap = u 0 100000 65536
DEBIAN_MINIMUM_RELEASE = 4
# os-release IDs that PVE::LXC::Setup maps to a plugin other than Debian's (plugins and aliases).
_PVE_OTHER_PLUGINS = {"alpine", "archlinux", "arch", "centos", "devuan", "fedora", "gentoo", "openeuler",
                      "openEuler", "opensuse", "opensuse-leap", "opensuse-tumbleweed", "opensuse-slowroll", "sles",
                      "ubuntu", "nixos", "unmanaged"}
_DEBIAN_VERSION_MAP = {"stretch/sid": "9.1", "buster/sid": "10", "bullseye/sid": "11", "bookworm/sid": "12",
                       "trixie/sid": "13", "forky/sid": "14", "duke/sid": "15", "kali-rolling": "12"}
_DNS_NAME = re.compile(r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9\-]*[a-zA-Z0-9])?\.)*[A-Za-z0-9](?:[A-Za-z0-9\-]*[A-Za-z0-9])?",
                       re.ASCII)
_IFNAME = re.compile(r"[-_.\w]+", re.ASCII)  # PVE::LXC::Config net 'name' pattern
_SNAKEOIL_UNIT = """[Unit]
Description="Regenerate pre-generated snakeoil certificate and key-pair once"
ConditionPathExists=/etc/ssl/certs/ssl-cert-snakeoil.pem
ConditionFirstBoot=yes
Wants=first-boot-complete.target
Before=first-boot-complete.target

[Service]
Type=oneshot
ExecStart=make-ssl-cert -f generate-default-snakeoil
"""


@dataclass(frozen=True)
class PveNet:
    """One ``netN`` of a Proxmox container (the list index is N): ``name=...,ip=...,gw=...``."""

    name: str = "eth0"          # the container interface
    ip: str = "dhcp"            # "dhcp", "manual", or "A.B.C.D/N" (static)
    gw: str | None = None       # static gateway


# --- arguments ------------------------------------------------------------------------------------------------


def _split_list(text: str | None) -> list[str]:
    """PVE::Tools::split_list: commas, semicolons and whitespace separate."""
    text = text or ""
    if "\0" in text:
        return text.split("\0")
    return [t for t in re.split(r"\s+", re.sub(r"[,;]", " ", text).lstrip(), flags=re.ASCII) if t]


def _check_hostname(hostname: str) -> None:
    if not isinstance(hostname, str) or not _DNS_NAME.fullmatch(hostname) or len(hostname) > 253:
        raise ValueError(f"hostname {hostname!r} is not a DNS name (PVE format 'dns-name')")


def _check_nets(nets: list[PveNet]) -> None:
    if len(nets) > PVE_MAX_NETS:
        raise ValueError(f"{len(nets)} networks: Proxmox allows net0 to net{PVE_MAX_NETS - 1}")
    seen: set[str] = set()
    for i, net in enumerate(nets):
        if not isinstance(net, PveNet):
            raise ValueError(f"net{i}: expected a PveNet, got {type(net).__name__}")
        if not _IFNAME.fullmatch(net.name) or len(net.name) > 15:
            raise ValueError(f"net{i}: interface name {net.name!r} is not 1 to 15 of [-_.A-Za-z0-9]")
        if net.name in seen:
            raise ValueError(f"net{i}: interface name {net.name!r} is used twice")
        seen.add(net.name)
        if net.ip not in ("dhcp", "manual"):
            if not re.fullmatch(r"\d{1,3}(?:\.\d{1,3}){3}/\d{1,2}", net.ip, re.ASCII):
                raise ValueError(f"net{i}: ip {net.ip!r} is neither 'dhcp', 'manual' nor 'A.B.C.D/N'")
            try:
                ipaddress.IPv4Interface(net.ip)
            except ValueError as exc:
                raise ValueError(f"net{i}: ip {net.ip!r}: {exc}") from None
        if net.gw is not None:
            if net.ip in ("dhcp", "manual"):
                raise ValueError(f"net{i}: gw {net.gw!r} given with ip={net.ip}; PVE writes a gateway only for a "
                                 "static address")
            try:
                ipaddress.IPv4Address(net.gw)
            except ValueError:
                raise ValueError(f"net{i}: gw {net.gw!r} is not an IPv4 address") from None


def _check_nameservers(nameserver: str | None) -> None:
    for ns in _split_list(nameserver):
        try:
            ipaddress.ip_address(ns.split("%", 1)[0])
        except ValueError:
            raise ValueError(f"nameserver {ns!r} is not an IP address") from None


# --- the rootfs, as chroot() would see it ---------------------------------------------------------------------


class _Root:
    """Paths of the container (``/etc/hosts``) resolved inside `root` the way a chroot resolves them: symlinks
    are followed, but an absolute target starts again at `root` and ``..`` stops at it. Records what it writes."""

    def __init__(self, root: Path) -> None:
        self.root = Path(os.path.realpath(root))
        try:
            st = os.stat(self.root)
        except OSError as exc:
            raise ValueError(f"rootfs {root}: {exc.strerror}") from None
        if not stat.S_ISDIR(st.st_mode):
            raise ValueError(f"rootfs {root}: not a directory")
        self.owner = (st.st_uid, st.st_gid)
        self.written: set[str] = set()

    def _walk(self, ct_path: str, follow_last: bool) -> list[str]:
        parts = deque(ct_path.split("/"))
        resolved: list[str] = []
        hops = 0
        while parts:
            comp = parts.popleft()
            if comp in ("", "."):
                continue
            if comp == "..":
                if resolved:
                    resolved.pop()
                continue
            here = self.root.joinpath(*resolved, comp)
            if (parts or follow_last) and os.path.islink(here):
                hops += 1
                if hops > 40:
                    raise OSError(40, "Too many levels of symbolic links", ct_path)
                target = os.readlink(here)
                if target.startswith("/"):
                    resolved = []
                parts.extendleft(reversed(target.split("/")))
                continue
            resolved.append(comp)
        return resolved

    def real(self, ct_path: str) -> Path:
        """The host path of `ct_path`, every symlink on the way followed (inside the root)."""
        return self.root.joinpath(*self._walk(ct_path, True))

    def parent_and_name(self, ct_path: str) -> tuple[Path, str]:
        """The resolved directory holding `ct_path`, and its last component (not followed)."""
        head, _, name = ct_path.rstrip("/").rpartition("/")
        if name in ("", ".", ".."):
            raise ValueError(f"{ct_path!r} names no file")
        return self.root.joinpath(*self._walk(head or "/", True)), name

    def rel(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    # Perl file tests and helpers (Base.pm ct_*), on container paths.

    def _lstat_real(self, ct_path: str) -> os.stat_result | None:
        try:
            return os.lstat(self.real(ct_path))
        except OSError:                                   # missing, dangling, or a symlink loop: Perl's -f is false
            return None

    def is_file(self, ct_path: str) -> bool:              # -f
        st = self._lstat_real(ct_path)
        return st is not None and stat.S_ISREG(st.st_mode)

    def is_executable(self, ct_path: str) -> bool:        # -x, as root
        st = self._lstat_real(ct_path)
        return st is not None and (stat.S_ISDIR(st.st_mode) or bool(st.st_mode & 0o111))

    def is_symlink(self, ct_path: str) -> bool:           # -l
        parent, name = self.parent_and_name(ct_path)
        return os.path.islink(parent / name)

    def readlink(self, ct_path: str) -> str | None:
        parent, name = self.parent_and_name(ct_path)
        try:
            return os.readlink(parent / name)
        except OSError:
            return None

    def is_ignored(self, ct_path: str) -> bool:           # ct_is_file_ignored
        head, _, name = ct_path.rpartition("/")
        return self.is_file(f"{head}/.pve-ignore.{name}")

    def get_contents(self, ct_path: str) -> str:
        fd = os.open(self.real(ct_path), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as f:
            return f.read().decode("utf-8", "surrogateescape")

    def _chown(self, name: str, dfd: int, *, link: bool = False) -> None:
        if os.geteuid() == 0:
            os.chown(name, *self.owner, dir_fd=dfd, follow_symlinks=not link)

    def _open_dir(self, parent: Path) -> int:
        return os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)

    def set_contents(self, ct_path: str, data: str, mode: int = 0o644) -> None:
        """ct_file_set_contents: PVE::Tools::file_set_contents into the resolved directory. The rename
        replaces the last component itself, so a symlink there is replaced, never written through."""
        if self.is_ignored(ct_path):
            return
        parent, name = self.parent_and_name(ct_path)
        dfd = self._open_dir(parent)
        tmp = f"{name}.tmp.{os.getpid()}"
        try:
            try:
                os.unlink(tmp, dir_fd=dfd)
            except FileNotFoundError:
                pass
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=dfd)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data.encode("utf-8", "surrogateescape"))
                    os.fchmod(f.fileno(), mode)  # O_CREAT's mode went through the umask
                    if os.geteuid() == 0:
                        os.fchown(f.fileno(), *self.owner)
                os.replace(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
            except BaseException:
                try:
                    os.unlink(tmp, dir_fd=dfd)
                except OSError:
                    pass
                raise
        finally:
            os.close(dfd)
        self.written.add(self.rel(parent / name))

    def _at(self, ct_path: str, op) -> bool:
        """Run op(name, dir_fd) in the resolved parent directory of ct_path; False where PVE's Perl call would
        fail silently (no such directory, exists, ...)."""
        parent, name = self.parent_and_name(ct_path)
        try:
            dfd = self._open_dir(parent)
        except OSError:
            return False
        try:
            op(name, dfd)
            return True
        except OSError:
            return False
        finally:
            os.close(dfd)

    def unlink(self, ct_path: str) -> bool:
        # CORE::unlink's failure is ignored
        return not self.is_ignored(ct_path) and self._at(ct_path, lambda name, dfd: os.unlink(name, dir_fd=dfd))

    def symlink(self, target: str, ct_path: str) -> bool:
        # CORE::symlink's failure (exists, no directory) is ignored
        if self.is_ignored(ct_path):
            return False

        def op(name: str, dfd: int) -> None:
            os.symlink(target, name, dir_fd=dfd)
            self._chown(name, dfd, link=True)

        if not self._at(ct_path, op):
            return False
        parent, name = self.parent_and_name(ct_path)
        self.written.add(self.rel(parent / name))
        return True

    def mkdir(self, ct_path: str, mode: int = 0o755) -> bool:
        def op(name: str, dfd: int) -> None:
            os.mkdir(name, mode, dir_fd=dfd)
            self._chown(name, dfd)

        return self._at(ct_path, op)

    def make_path(self, ct_path: str) -> None:            # File::Path::make_path
        prefix = ""
        for comp in [c for c in ct_path.split("/") if c]:
            prefix += "/" + comp
            if not os.path.isdir(self.real(prefix)):
                self.mkdir(prefix)


def _perl_lines(text: str) -> list[str]:
    """split(/\\n/, $text): trailing empty fields dropped."""
    lines = text.split("\n")
    while lines and lines[-1] == "":
        lines.pop()
    return lines


def _chomp(text: str) -> str:
    return text[:-1] if text.endswith("\n") else text


# --- the distribution (Setup.pm autodetection, Debian.pm new) -------------------------------------------------


def _os_release_id(r: _Root) -> str | None:
    for path in ("/etc/os-release", "/usr/lib/os-release"):
        if r.is_file(path):
            for line in r.get_contents(path).split("\n"):
                m = re.match(r"\s*ID=(.*)$", line, re.ASCII)
                if m:
                    value = m.group(1).strip()
                    q = re.match(r"'([^']*)'|\"((?:[^\"\\]|\\.)*)\"|([A-Za-z0-9]*)", value)
                    return next((g for g in q.groups() if g is not None), "") if q else ""
            return None
    return None


def _debian_version(r: _Root) -> int:
    """Setup.pm's autodetection must pick the Debian plugin; then Debian.pm new(): the major release from
    /etc/debian_version."""
    os_id = _os_release_id(r)
    if os_id in _PVE_OTHER_PLUGINS:
        raise ValueError(f"{r.root}: os-release ID is {os_id!r}, for which PVE uses another plugin than Debian's "
                         "(the only one emulated here)")
    if os_id != "debian" and r.is_file("/etc/lsb-release") and re.search(
            r"^DISTRIB_ID=Ubuntu$", r.get_contents("/etc/lsb-release"), re.M | re.I):
        raise ValueError(f"{r.root}: /etc/lsb-release says Ubuntu, for which PVE uses its Ubuntu plugin")
    if not r.is_file("/etc/debian_version"):
        raise ValueError(f"{r.root}: no etc/debian_version (PVE: unable to read version info)")
    lines = r.get_contents("/etc/debian_version").split("\n")
    version = lines[0] if lines else ""
    version = _DEBIAN_VERSION_MAP.get(version, version)
    m = re.match(r"(\d+(\.\d+)?)(\.\d+)?", version, re.ASCII)
    if not m:
        raise ValueError(f"{r.root}: unable to parse version info {version!r} in etc/debian_version")
    major = int(float(m.group(1)))
    if major < DEBIAN_MINIMUM_RELEASE:
        raise ValueError(f"{r.root}: container Debian version {major} is too old")
    return major


def _at_least(version: int, want_major: int, want_minor: int) -> bool:
    """Debian.pm at_least() for an integer version (what new() stores): the minor is undefined."""
    return want_major < version or (want_major == version and want_minor == 0)


# --- Base.pm: ct_modify_file, hosts, DNS ----------------------------------------------------------------------


def _modify_file(r: _Root, ct_path: str, data: str, *, replace: bool = False, prepend: bool = False,
                 delete: bool = False) -> None:
    """Base.pm ct_modify_file: put `data` between the PVE markers, keep everything else."""
    if r.is_ignored(ct_path):
        return
    head, tail = PVE_HEAD, PVE_TAIL
    if data and not data.endswith("\n"):
        data += "\n"
    if not r.is_file(ct_path):
        if data:
            r.set_contents(ct_path, head + data + tail)
        return
    lines = _perl_lines(r.get_contents(ct_path))
    beg = end = None
    for i, line in enumerate(lines):
        if beg is None and re.match(r"#\s*---\s*BEGIN\s*PVE\s*", line, re.ASCII):
            beg = i
        if end is None and beg is not None and re.match(r"#\s*---\s*END\s*PVE\s*", line, re.ASCII | re.I):
            end = i
        if beg is not None and end is not None:
            break
    if beg is not None and end is not None:
        if data:
            lines[beg:end + 1] = [head + data + _chomp(tail)]
        else:
            if beg == 0 and end == len(lines) - 1:
                if delete:
                    r.unlink(ct_path)
                return
            lines[beg:end + 1] = [head + data + tail]
        r.set_contents(ct_path, "\n".join(lines) + "\n")
    elif data:
        content = _chomp("\n".join(lines))
        if not content and not data and delete:
            r.unlink(ct_path)
            return
        content += "\n"
        data = head + data + tail
        if replace:
            r.set_contents(ct_path, data)
        elif prepend:
            r.set_contents(ct_path, data + content)
        else:
            r.set_contents(ct_path, content + data)


def _remove_pve_sections(data: str) -> str:
    return re.sub(r"^[ \t]*" + re.escape(_chomp(PVE_HEAD)) + r".*^[ \t]*" + re.escape(_chomp(PVE_TAIL)) + r".*?$",
                  "", data, flags=re.M | re.S)


def _read_host_resolv_conf(path: Path | None) -> dict[str, str]:
    """PVE::INotify::read_etc_resolv_conf: the last search/domain, the first three nameservers."""
    res: dict[str, str] = {}
    if path is None:
        return res
    count = 0
    for line in path.read_text(errors="surrogateescape").split("\n"):
        m = re.match(r"(search|domain)\s+(\S+)\s*", line, re.ASCII)
        if m:
            res["search"] = m.group(2)
            continue
        m = re.match(r"\s*nameserver\s+(\S+)", line, re.ASCII)
        if m:
            try:
                ipaddress.ip_address(m.group(1))
            except ValueError:
                continue
            count += 1
            if count <= 3:
                res[f"dns{count}"] = m.group(1)
    return res


def _lookup_dns_conf(nameserver: str | None, searchdomain: str | None,
                     host: dict[str, str]) -> tuple[str | None, str]:
    """Base.pm lookup_dns_conf: the container's settings, else the host's resolv.conf."""
    if nameserver is None:
        nameserver = " ".join(host[k] for k in ("dns1", "dns2", "dns3") if host.get(k))
    if searchdomain is None:
        searchdomain = host.get("search")
    return searchdomain, nameserver


def _update_etc_hosts(r: _Root, hostip: str | None, newname: str, searchdomains: str | None) -> None:
    hosts = "/etc/hosts"
    if r.is_ignored(hosts):
        return
    namepart = newname.split(".", 1)[0]
    if "." in newname:
        all_names = f"{newname} {namepart}"
    else:
        all_names = " ".join([f"{newname}.{d}" for d in _split_list(searchdomains)] + [newname])
    lo4 = "127.0.0.1 localhost.localnet localhost\n"
    lo6 = "::1 localhost.localnet localhost\n"
    section = ""
    if r.is_file(hosts):
        data = _remove_pve_sections(r.get_contents(hosts))
        if not re.search(r"^[ \t]*127\.0\.0\.1[ \t]+", data, re.M):
            section += lo4
        if not re.search(r"^[ \t]*::1[ \t]+", data, re.M):
            section += lo6
    else:
        section += lo4 + lo6
    if hostip is not None:
        section += f"{hostip} {all_names}\n"
    elif namepart != "localhost":
        section += f"127.0.1.1 {all_names}\n"
    else:
        section += f"127.0.1.1 {namepart}\n"
    _modify_file(r, hosts, section)


def _primary_ipv4(nets: list[PveNet]) -> str | None:
    """PVE::LXC::get_primary_ips: net0's address without the prefix length, unless dhcp/manual."""
    if not nets or nets[0].ip in ("dhcp", "manual"):
        return None
    return re.sub(r"/\d+$", "", nets[0].ip)


def _set_hostname(r: _Root, hostname: str, nets: list[PveNet], searchdomains: str | None) -> None:
    _update_etc_hosts(r, _primary_ipv4(nets), hostname, searchdomains)
    r.set_contents("/etc/hostname", hostname.split(".", 1)[0] + "\n")


def _set_dns(r: _Root, searchdomains: str | None, nameserver: str) -> None:
    data = ""
    if searchdomains:
        data += "search " + " ".join(_split_list(searchdomains)) + "\n"
    for ns in _split_list(nameserver):
        data += f"nameserver {ns}\n"
    _modify_file(r, "/etc/resolv.conf", data, replace=True)


# --- Base.pm / Debian.pm: init --------------------------------------------------------------------------------


def _systemd_dir(r: _Root) -> str:
    return "/lib/systemd/system" if r.is_executable("/lib/systemd/systemd") else "/usr/lib/systemd/system"


def _setup_container_getty_service(r: _Root, ttycount: int) -> None:
    template_path = f"{_systemd_dir(r)}/container-getty@.service"
    instance_base = "container-getty@"
    if not r.is_file(template_path):
        # PVE falls back to "getty@.service", a path relative to the chroot's "/" that no distribution ships:
        # without container-getty@.service nothing more happens.
        return
    raw = r.get_contents(template_path)
    new = re.sub(r"pts/%I|lxc/tty%I", "tty%I", raw)   # Debian.pm devttydir: '' (no /dev/lxc/)
    if new != raw:
        r.set_contents(template_path, new)
    wants = "/etc/systemd/system/getty.target.wants"
    for i in range(1, 7):
        r.unlink(f"{wants}/getty@tty{i}.service")
        r.unlink(f"{wants}/container-getty@{i}.service")
        if i <= ttycount:
            r.symlink(template_path, f"{wants}/{instance_base}{i}.service")
    r.unlink("/etc/systemd/system/getty.target")   # ensure getty.target is not masked


def _setup_systemd_preset(r: _Root, extra: dict[str, bool]) -> None:
    preset = {"sys-kernel-config.mount": False, "sys-kernel-debug.mount": False, "getty@.service": False,
              "container-getty@.service": True, **extra}
    data = "# Added by PVE at create-time for first-boot configuration.\n"
    for service in sorted(preset):
        data += f"{'enable' if preset[service] else 'disable'} {service}\n"
    r.mkdir("/etc/systemd/system-preset", 0o755)
    r.set_contents("/etc/systemd/system-preset/00-pve.preset", data)


def _setup_inittab(r: _Root, version: int, ttycount: int) -> None:
    if not r.is_file("/etc/inittab"):
        return
    lines = [ln for ln in _perl_lines(r.get_contents("/etc/inittab"))
             if not re.match(r"\s*\d+:\d*:[^:]*:.*getty", ln, re.ASCII) and not re.match(r"\s*p[fno0]:", ln, re.ASCII)]
    inittab = "\n".join(lines) + "\n" + "p0::powerfail:/sbin/init 0\n"
    for tty in range(1, ttycount + 1):
        if tty == 7:
            continue
        levels = "2345" if tty == 1 else "23"
        getty = "-L 38400" if version < 7 else "--noclear 38400"
        inittab += f"{tty}:{levels}:respawn:/sbin/getty {getty} tty{tty}\n"
    r.set_contents("/etc/inittab", inittab)


def _init_is_systemd(r: _Root) -> bool:
    target = r.readlink("/sbin/init")
    return target is not None and re.search(r"/systemd$", target) is not None


def _setup_init(r: _Root, version: int) -> None:
    if _init_is_systemd(r):
        _setup_container_getty_service(r, PVE_TTY_COUNT)
        if _at_least(version, 12, 0):
            # systemd-networkd gets enabled by default, disable it, debian uses ifupdown
            _setup_systemd_preset(r, {"systemd-networkd.service": False})
    _setup_inittab(r, version, PVE_TTY_COUNT)


def _clear_machine_id(r: _Root) -> None:
    uses_systemd = r.is_executable("/lib/systemd/systemd") or r.is_executable("/usr/lib/systemd/systemd")
    dbus, machine_id = "/var/lib/dbus/machine-id", "/etc/machine-id"
    existed = r.is_file(machine_id)
    if r.is_file(dbus) and not r.is_symlink(dbus) and uses_systemd:
        r.unlink(dbus)
    if existed:
        r.unlink(machine_id)


def _snakeoil_fixup(r: _Root) -> None:
    key = "/etc/ssl/private/ssl-cert-snakeoil.key"
    if not r.is_file(key):
        return
    if _init_is_systemd(r):
        unit = "proxmox-regenerate-snakeoil.service"
        unit_path = f"/etc/systemd/system/{unit}"
        r.set_contents(unit_path, _SNAKEOIL_UNIT)
        r.make_path("/etc/systemd/system/first-boot-complete.target.wants")
        r.symlink(unit_path, f"/etc/systemd/system/first-boot-complete.target.wants/{unit}")
    r.unlink(key)


# --- Debian.pm: setup_network ---------------------------------------------------------------------------------


@dataclass
class _Net:
    address: str                 # "dhcp", "manual" or the bare address
    netmask: str | None = None
    cidr: str | None = None
    gateway: str | None = None
    needsroute: bool = False


@dataclass
class _Section:
    type: str                    # "ipv4" or "ipv6"
    ifname: str
    attr: list[str]


def _remove_gateway_scripts(attr: list[str]) -> None:
    length = len(attr)
    found, keep, kept = False, True, []
    for line in attr:
        if line == _chomp(PVE_HEAD):
            found, keep = True, False
        elif line == _chomp(PVE_TAIL):
            found, keep = True, True
        elif keep:
            kept.append(line)
    attr[:] = kept
    if found:
        return
    # Older containers: the four route lines PVE used to add, unmarked.
    i = 0
    while i < length - 3:
        m = re.match(r"\s*post-up\s+ip\s+route\s+add\s+(\S+)\s+dev\s+(\S+)$", attr[i], re.ASCII)
        if m:
            ip, dev = m.groups()
            m1 = re.match(r"\s*post-up\s+ip\s+route\s+add\s+default\s+via\s+(\S+)\s+dev\s+(\S+)$", attr[i + 1], re.ASCII)
            m2 = re.match(r"\s*pre-down\s+ip\s+route\s+del\s+default\s+via\s+(\S+)\s+dev\s+(\S+)$", attr[i + 2], re.ASCII)
            m3 = re.match(r"\s*pre-down\s+ip\s+route\s+del\s+(\S+)\s+dev\s+(\S+)$", attr[i + 3], re.ASCII)
            if all(mm and mm.groups() == (ip, dev) for mm in (m1, m2, m3)):
                del attr[i:i + 4]
                length -= 4
                continue
        i += 1


def _make_gateway_scripts(ifname: str, gw: str) -> str:
    return (f"{PVE_HEAD}\tpost-up ip route add {gw} dev {ifname}\n\tpost-up ip route add default via {gw} dev {ifname}\n"
            f"\tpre-down ip route del default via {gw} dev {ifname}\n\tpre-down ip route del {gw} dev {ifname}\n"
            f"{PVE_TAIL}")


def _networks(nets: list[PveNet]) -> dict[str, _Net]:
    networks: dict[str, _Net] = {}
    for d in nets:
        if d.ip in ("dhcp", "manual"):
            net = _Net(address=d.ip)
        else:
            iface = ipaddress.IPv4Interface(d.ip)
            net = _Net(address=str(iface.ip), netmask=str(iface.netmask), cidr=d.ip)
        if d.gw is not None:
            net.gateway = d.gw
            if net.cidr is not None and ipaddress.IPv4Address(d.gw) not in ipaddress.IPv4Interface(net.cidr).network:
                net.needsroute = True           # gateway is not reachable, need an extra route
        networks[d.name] = net
    return networks


def _interfaces(existing: str | None, networks: dict[str, _Net], version: int) -> str:
    """The new /etc/network/interfaces, from the old one (None: there is none)."""
    out: list[str] = []
    section: _Section | None = None
    done_auto: set[str] = set()
    done_v4: set[str] = set()
    done_v6: set[str] = set()
    cidr_form = _at_least(version, 10, 0)

    def print_section() -> None:
        nonlocal section
        if section is None:
            return
        ifname, net = section.ifname, networks[section.ifname]
        if ifname not in done_auto:
            out.append(f"auto {ifname}\n")
            done_auto.add(ifname)
        if section.type == "ipv4":
            done_v4.add(ifname)
            if net.address in ("dhcp", "manual"):
                out.append(f"iface {ifname} inet {net.address}\n\n")
            else:
                out.append(f"iface {ifname} inet static\n")
                if cidr_form:
                    out.append(f"\taddress {net.cidr}\n")
                else:
                    out.append(f"\taddress {net.address}\n\tnetmask {net.netmask}\n")
                _remove_gateway_scripts(section.attr)
                if net.gateway is not None:
                    out.append(_make_gateway_scripts(ifname, net.gateway) if net.needsroute
                               else f"\tgateway {net.gateway}\n")
                out.extend(f"\t{a}\n" for a in section.attr)
                out.append("\n")
        else:
            done_v6.add(ifname)      # no ip6 here: PVE writes no inet6 section, and drops the old one
        section = None

    if existing is not None:
        for line in _perl_lines(existing):
            if re.match(r"# --- (?:BEGIN|END) PVE ---", line):
                if section is not None:
                    section.attr.append(line)   # so remove_gateway_scripts() finds them
                continue
            if line.startswith("#"):
                out.append(f"{line}\n")
                continue
            if re.fullmatch(r"\s*", line, re.ASCII):
                if section is not None:
                    print_section()
                else:
                    out.append(f"{line}\n")
                continue
            m = re.match(r"\s*iface\s+(\S+)\s+inet(6?)\s+(\S+)\s*$", line, re.ASCII)
            if m:
                print_section()
                if m.group(1) not in networks:
                    out.append(f"{line}\n")
                    continue
                section = _Section("ipv6" if m.group(2) else "ipv4", m.group(1), [])
                continue
            m = re.match(r"\s*auto\s*(.*)$", line, re.ASCII)
            if m:
                done_auto.update(i for i in re.split(r"\s+", m.group(1), flags=re.ASCII) if i)
                print_section()
                out.append(f"{line}\n")
                continue
            if re.match(r"\s*(?:mapping\s|allow-|source\s|source-directory\s)", line, re.ASCII):
                print_section()
                out.append(f"{line}\n")
                continue
            m = re.match(r"\s*((\S+)\s(.*))$", line, re.ASCII)
            if section is not None and m:
                if m.group(2) not in ("address", "netmask", "gateway", "broadcast"):
                    section.attr.append(m.group(1))
                continue
            out.append(f"{line}\n")
        print_section()

    text = "".join(out)
    need_separator = bool(text) and not text.endswith("\n\n")
    for ifname in sorted(networks):
        if ifname not in done_v4:
            if need_separator:
                out.append("\n")
                need_separator = False
            section = _Section("ipv4", ifname, [])
            print_section()
    text = "".join(out)
    # older templates (< Debian 8) do not configure the loopback interface if not explicitly told to do so
    if "lo" not in done_auto:
        text = "auto lo\niface lo inet loopback\niface lo inet6 loopback\n\n" + text
    return text


def _setup_network(r: _Root, nets: list[PveNet], version: int) -> None:
    networks = _networks(nets)
    if not networks:
        return
    path = "/etc/network/interfaces"
    existing = r.get_contents(path) if r.is_file(path) else None
    r.set_contents(path, _interfaces(existing, networks, version))


# --- the public functions -------------------------------------------------------------------------------------


def pct_setup(rootfs: Path, *, hostname: str, nets: list[PveNet], nameserver: str | None, searchdomain: str | None,
              create: bool = True, host_resolv_conf: Path | None = None) -> list[str]:
    """Write into rootfs what pve-container writes at create/start for a Debian container; return the paths
    (relative to rootfs, e.g. "etc/hostname") written, sorted.

    With `create` (the default) it is ``pct create`` (Base.pm post_create_hook: machine-id removed, snakeoil
    key replaced by a first-boot unit, init, network, hostname, DNS) followed by ``pct start`` (pre_start_hook:
    /fastboot, then init, network, hostname and DNS again); without it, ``pct start`` alone. Files PVE removes
    (etc/machine-id, var/lib/dbus/machine-id, getty.target.wants links) are not in the list. Paths are where
    the bytes landed: container-getty@.service is reported under usr/lib when lib is a link to usr/lib.
    `nameserver` and `searchdomain` are PVE's lists (space, comma or semicolon separated); None takes the
    PVE host's value, read from `host_resolv_conf` (PVE reads the node's /etc/resolv.conf), or nothing.
    Raises ValueError for bad arguments or a rootfs that is not Debian, OSError when a write fails."""
    _check_hostname(hostname)
    _check_nets(nets)
    _check_nameservers(nameserver)
    r = _Root(rootfs)
    version = _debian_version(r)
    host = _read_host_resolv_conf(host_resolv_conf)
    searchdomains, nameservers = _lookup_dns_conf(nameserver, searchdomain, host)

    def setup() -> None:
        _setup_init(r, version)
        _setup_network(r, nets, version)
        _set_hostname(r, hostname, nets, searchdomains)
        _set_dns(r, searchdomains, nameservers)

    if create:                                   # post_create_hook
        _clear_machine_id(r)
        _snakeoil_fixup(r)
        setup()
    r.set_contents("/fastboot", "")              # pre_start_hook: skips fsck, among other things
    setup()
    return sorted(r.written)


def lxc_config_lines(hostname: str, nets: list[PveNet], bridge: str, *, unprivileged: bool | None = None,
                     nesting: bool = False) -> list[str]:
    """The LXC config keys Proxmox generates for such a container that matter for booting, in
    PVE::LXC::update_lxc_config's order, not including rootfs path or arch.

    Written as PVE writes them: the AppArmor profile (``generated``, plus its ``deny mount`` rules without the
    nesting feature), ``lxc.tty.max`` (2), ``lxc.environment = TERM=linux``, ``lxc.uts.name`` and per network
    ``lxc.net.N.type = veth`` and ``lxc.net.N.name``. With `unprivileged` given, the privilege-dependent keys
    too: the includes of /usr/share/lxc/config/debian.common.conf (and debian.userns.conf), and for an
    unprivileged container ``lxc.mount.auto = sys:mixed`` and the 100000:65536 id maps. None leaves them out.

    Adapted to plain LXC: ``lxc.net.N.link = BRIDGE`` stands for PVE's ``script.up = lxcnetaddbr`` (its hook
    adds the host end to the bridge). Not written: ``hwaddr`` (PVE draws a random one with its BC:24:11 prefix
    at create time), ``veth.pair`` (veth<vmid>i<N>, no vmid here), ``mtu`` (the bridge's, read on the node),
    the cgroup limits and cgroup.dir keys, the seccomp profile file of PVE's lxc package, and no
    ``lxc.net.N.flags``: PVE sets none, so the interface comes up only when the container's ifupdown
    brings it up."""
    _check_hostname(hostname)
    _check_nets(nets)
    if not bridge or len(bridge) > 15 or not re.fullmatch(r"[^\s/=]+", bridge):
        raise ValueError(f"bridge {bridge!r} is not an interface name")
    lines: list[str] = []
    if unprivileged is not None:
        lines.append(f"lxc.include = {LXC_CONFIG_DIR}/debian.common.conf")
        if unprivileged:
            lines.append(f"lxc.include = {LXC_CONFIG_DIR}/debian.userns.conf")
    lines.append("lxc.apparmor.profile = generated")
    if nesting:
        lines.append("lxc.apparmor.allow_nesting = 1")
    else:
        lines += ["lxc.apparmor.raw = deny mount -> /proc/,", "lxc.apparmor.raw = deny mount -> /sys/,"]
    if unprivileged:
        lines.append("lxc.mount.auto = sys:mixed")
        lines += [f"lxc.idmap = u 0 {UNPRIVILEGED_BASE} 65536", f"lxc.idmap = g 0 {UNPRIVILEGED_BASE} 65536"]
    lines += [f"lxc.tty.max = {PVE_TTY_COUNT}", "lxc.environment = TERM=linux", f"lxc.uts.name = {hostname}"]
    for i, net in enumerate(nets):
        lines += [f"lxc.net.{i}.type = veth", f"lxc.net.{i}.link = {bridge}", f"lxc.net.{i}.name = {net.name}"]
    return lines
