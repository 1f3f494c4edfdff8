"""The pct create/start emulation (tmplbuild/boot/proxmox.py) on a small tree laid out like a Debian 12
template: expected bytes are what pve-container's Debian.pm and Base.pm produce for the same input."""
from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from tmplbuild.boot.proxmox import PveNet, lxc_config_lines, pct_setup

HEAD, TAIL = "# --- BEGIN PVE ---\n", "# --- END PVE ---\n"
PRESET = ("# Added by PVE at create-time for first-boot configuration.\n"
          "enable container-getty@.service\n"
          "disable getty@.service\n"
          "disable sys-kernel-config.mount\n"
          "disable sys-kernel-debug.mount\n"
          "disable systemd-networkd.service\n")
GETTY_UNIT = ("[Unit]\nDescription=Container Getty on /dev/pts/%I\nConditionPathExists=/dev/pts/%I\n\n[Service]\n"
              "ExecStart=-/sbin/agetty -o '-p -- \\\\u' --noclear --keep-baud pts/%I 115200,38400,9600 $TERM\n"
              "UtmpIdentifier=pts/%I\nTTYPath=/dev/pts/%I\n")
DNS = dict(nameserver="10.1.0.1", searchdomain="test.invalid")


def make_rootfs(base: Path, *, debian_version: str = "12.8") -> Path:
    """A Debian 12 template, as far as pct looks at it: merged /usr, systemd as /sbin/init, interfaces with the
    loopback only, an empty resolv.conf, hostname localhost, an empty machine-id, no /etc/hosts."""
    root = base / "rootfs"
    for d in ("usr/bin", "usr/sbin", "usr/lib/systemd/system", "etc/network", "etc/systemd/system/getty.target.wants",
              "var/lib/dbus", "run"):
        (root / d).mkdir(parents=True)
    for name in ("bin", "sbin", "lib"):
        (root / name).symlink_to(f"usr/{name}")
    (root / "usr/lib/systemd/systemd").write_text("#!/bin/true\n")
    (root / "usr/lib/systemd/systemd").chmod(0o755)
    (root / "usr/sbin/init").symlink_to("/lib/systemd/systemd")
    (root / "usr/lib/systemd/system/container-getty@.service").write_text(GETTY_UNIT)
    (root / "usr/lib/systemd/system/getty@.service").write_text("[Unit]\nDescription=Getty on %I\n")
    (root / "etc/systemd/system/getty.target.wants/getty@tty1.service").symlink_to("/lib/systemd/system/getty@.service")
    (root / "usr/lib/os-release").write_text('PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nVERSION_ID="12"\nID=debian\n')
    (root / "etc/os-release").symlink_to("../usr/lib/os-release")
    (root / "etc/debian_version").write_text(debian_version + "\n")
    (root / "etc/network/interfaces").write_text("auto lo\niface lo inet loopback\n")
    (root / "etc/resolv.conf").write_text("")
    (root / "etc/hostname").write_text("localhost\n")
    (root / "etc/machine-id").write_text("")
    (root / "var/lib/dbus/machine-id").symlink_to("/etc/machine-id")
    return root


def snapshot(root: Path) -> dict[str, tuple[str, bytes | str, int]]:
    """Every entry of the tree: type, content or link target, mode."""
    out: dict[str, tuple[str, bytes | str, int]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            st = p.lstat()
            rel = p.relative_to(root).as_posix()
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(p), 0)
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", b"", stat.S_IMODE(st.st_mode))
            else:
                out[rel] = ("file", p.read_bytes(), stat.S_IMODE(st.st_mode))
    return out


def text(root: Path, rel: str) -> str:
    p = root / rel
    assert p.is_file() and not p.is_symlink(), f"{rel} is not a regular file"
    assert stat.S_IMODE(p.stat().st_mode) == 0o644, f"{rel} mode {oct(p.stat().st_mode)}"
    return p.read_text()


def test_dhcp_writes_what_pve_writes(tmp_path: Path) -> None:
    root = make_rootfs(tmp_path)
    written = pct_setup(root, hostname="ct1", nets=[PveNet(name="eth0", ip="dhcp")], **DNS)

    assert text(root, "etc/network/interfaces") == (
        "auto lo\niface lo inet loopback\n\nauto eth0\niface eth0 inet dhcp\n\n")
    assert text(root, "etc/hostname") == "ct1\n"
    # No address for net0: the name goes on 127.0.1.1, with the search domain.
    assert text(root, "etc/hosts") == (HEAD + "127.0.0.1 localhost.localnet localhost\n"
                                       "::1 localhost.localnet localhost\n"
                                       "127.0.1.1 ct1.test.invalid ct1\n" + TAIL)
    assert text(root, "etc/resolv.conf") == HEAD + "search test.invalid\nnameserver 10.1.0.1\n" + TAIL
    assert text(root, "etc/systemd/system-preset/00-pve.preset") == PRESET
    assert text(root, "fastboot") == ""
    assert written == [
        "etc/hostname", "etc/hosts", "etc/network/interfaces", "etc/resolv.conf",
        "etc/systemd/system-preset/00-pve.preset",
        "etc/systemd/system/getty.target.wants/container-getty@1.service",
        "etc/systemd/system/getty.target.wants/container-getty@2.service",
        "fastboot", "usr/lib/systemd/system/container-getty@.service",
    ]


def test_create_sets_up_the_console_and_first_boot(tmp_path: Path) -> None:
    root = make_rootfs(tmp_path)
    pct_setup(root, hostname="ct1", nets=[PveNet()], **DNS)

    # container-getty@ on /dev/ttyN (Debian: no /dev/lxc/), two of them (tty default 2), getty@tty1 gone.
    assert text(root, "usr/lib/systemd/system/container-getty@.service") == GETTY_UNIT.replace("pts/%I", "tty%I")
    wants = root / "etc/systemd/system/getty.target.wants"
    assert sorted(p.name for p in wants.iterdir()) == ["container-getty@1.service", "container-getty@2.service"]
    for p in wants.iterdir():
        assert os.readlink(p) == "/lib/systemd/system/container-getty@.service"
    # clear_machine_id: the file goes (first boot), the dbus link to it stays.
    assert not (root / "etc/machine-id").exists()
    assert os.readlink(root / "var/lib/dbus/machine-id") == "/etc/machine-id"
    assert not list(root.rglob("*.tmp.*"))


def test_start_only_keeps_the_machine_id(tmp_path: Path) -> None:
    root = make_rootfs(tmp_path)
    (root / "etc/machine-id").write_text("0123456789abcdef0123456789abcdef\n")
    pct_setup(root, hostname="ct1", nets=[PveNet()], create=False, **DNS)
    assert (root / "etc/machine-id").read_text() == "0123456789abcdef0123456789abcdef\n"
    assert text(root, "etc/hostname") == "ct1\n"


def test_static_writes_address_and_gateway(tmp_path: Path) -> None:
    root = make_rootfs(tmp_path)
    pct_setup(root, hostname="ct2", nets=[PveNet(name="eth0", ip="10.1.0.51/24", gw="10.1.0.1")], **DNS)

    # Debian >= 10: the address in CIDR form, no netmask line.
    assert text(root, "etc/network/interfaces") == (
        "auto lo\niface lo inet loopback\n\n"
        "auto eth0\niface eth0 inet static\n\taddress 10.1.0.51/24\n\tgateway 10.1.0.1\n\n")
    # net0's static address, not 127.0.1.1.
    assert text(root, "etc/hosts") == (HEAD + "127.0.0.1 localhost.localnet localhost\n"
                                       "::1 localhost.localnet localhost\n"
                                       "10.1.0.51 ct2.test.invalid ct2\n" + TAIL)
    assert text(root, "etc/hostname") == "ct2\n"


def test_gateway_outside_the_subnet_gets_marked_routes(tmp_path: Path) -> None:
    root = make_rootfs(tmp_path)
    nets = [PveNet(name="eth0", ip="10.0.0.100/32", gw="11.0.0.1")]
    pct_setup(root, hostname="ct3.example.org", nets=nets, **DNS)
    expected = ("auto lo\niface lo inet loopback\n\n"
                "auto eth0\niface eth0 inet static\n\taddress 10.0.0.100/32\n" + HEAD +
                "\tpost-up ip route add 11.0.0.1 dev eth0\n"
                "\tpost-up ip route add default via 11.0.0.1 dev eth0\n"
                "\tpre-down ip route del default via 11.0.0.1 dev eth0\n"
                "\tpre-down ip route del 11.0.0.1 dev eth0\n" + TAIL + "\n")
    assert text(root, "etc/network/interfaces") == expected
    # A dotted hostname: the FQDN and its first label, no search domain appended; /etc/hostname the label.
    assert "10.0.0.100 ct3.example.org ct3\n" in text(root, "etc/hosts")
    assert text(root, "etc/hostname") == "ct3\n"
    # Back to an address inside the subnet: the marked route scripts go, a plain gateway comes.
    pct_setup(root, hostname="ct3", nets=[PveNet(ip="10.0.0.100/24", gw="10.0.0.1")], create=False, **DNS)
    assert text(root, "etc/network/interfaces") == (
        "auto lo\niface lo inet loopback\n\n"
        "auto eth0\niface eth0 inet static\n\taddress 10.0.0.100/24\n\tgateway 10.0.0.1\n\n")


@pytest.mark.parametrize("net", [PveNet(), PveNet(ip="10.1.0.51/24", gw="10.1.0.1"),
                                 PveNet(ip="10.0.0.100/32", gw="11.0.0.1")])
def test_rerun_is_idempotent(tmp_path: Path, net: PveNet) -> None:
    root = make_rootfs(tmp_path)
    first = pct_setup(root, hostname="ct1", nets=[net], **DNS)
    before = snapshot(root)
    again = pct_setup(root, hostname="ct1", nets=[net], **DNS)
    assert snapshot(root) == before
    # Same bytes rewritten; only the getty unit is left alone once it no longer says pts/%I (as in PVE).
    assert again == [p for p in first if p != "usr/lib/systemd/system/container-getty@.service"]
    pct_setup(root, hostname="ct1", nets=[net], create=False, **DNS)
    assert snapshot(root) == before


def test_user_sections_of_interfaces_are_kept(tmp_path: Path) -> None:
    root = make_rootfs(tmp_path)
    (root / "etc/network/interfaces").write_text(
        "# Written by the template's maintainer\n"
        "auto lo\n"
        "iface lo inet loopback\n"
        "\n"
        "allow-hotplug eth1\n"
        "iface eth1 inet static\n"
        "\taddress 192.168.5.2/24\n"
        "\tmtu 9000\n"
        "\n"
        "auto eth0\n"
        "iface eth0 inet static\n"
        "\taddress 10.9.9.9/24\n"
        "\tgateway 10.9.9.1\n"
        "\tdns-nameservers 10.9.9.1\n"
        "\n"
        "source /etc/network/interfaces.d/*\n")
    pct_setup(root, hostname="ct2", nets=[PveNet(ip="10.1.0.51/24", gw="10.1.0.1")], **DNS)
    # eth1 (not PVE's) stays as it was; eth0 (PVE's) is rewritten in place, its address and gateway replaced
    # and its other options kept; comments and the source line stay where they were.
    assert text(root, "etc/network/interfaces") == (
        "# Written by the template's maintainer\n"
        "auto lo\n"
        "iface lo inet loopback\n"
        "\n"
        "allow-hotplug eth1\n"
        "iface eth1 inet static\n"
        "\taddress 192.168.5.2/24\n"
        "\tmtu 9000\n"
        "\n"
        "auto eth0\n"
        "iface eth0 inet static\n"
        "\taddress 10.1.0.51/24\n"
        "\tgateway 10.1.0.1\n"
        "\tdns-nameservers 10.9.9.1\n"
        "\n"
        "source /etc/network/interfaces.d/*\n")


def test_new_interface_is_appended_after_user_sections(tmp_path: Path) -> None:
    root = make_rootfs(tmp_path)
    (root / "etc/network/interfaces").write_text("auto lo\niface lo inet loopback\nauto eth1\niface eth1 inet manual\n")
    pct_setup(root, hostname="ct1", nets=[PveNet()], **DNS)
    assert text(root, "etc/network/interfaces") == (
        "auto lo\niface lo inet loopback\nauto eth1\niface eth1 inet manual\n\nauto eth0\niface eth0 inet dhcp\n\n")


def test_no_interfaces_file_gets_a_loopback(tmp_path: Path) -> None:
    root = make_rootfs(tmp_path)
    (root / "etc/network/interfaces").unlink()
    pct_setup(root, hostname="ct1", nets=[PveNet()], **DNS)
    assert text(root, "etc/network/interfaces") == (
        "auto lo\niface lo inet loopback\niface lo inet6 loopback\n\nauto eth0\niface eth0 inet dhcp\n\n")


def test_existing_hosts_and_resolv_conf_keep_their_lines(tmp_path: Path) -> None:
    root = make_rootfs(tmp_path)
    (root / "etc/hosts").write_text("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
                                    "192.0.2.7 build-host\n")
    (root / "etc/resolv.conf").write_text("# from the build\nnameserver 192.0.2.53\n")
    pct_setup(root, hostname="ct1", nets=[PveNet()], **DNS)
    # hosts: the template's localhost lines count, so PVE's section holds only the container's name, appended.
    assert text(root, "etc/hosts") == ("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
                                       "192.0.2.7 build-host\n" + HEAD + "127.0.1.1 ct1.test.invalid ct1\n" + TAIL)
    # resolv.conf is replaced by PVE's section (ct_modify_file replace => 1).
    assert text(root, "etc/resolv.conf") == HEAD + "search test.invalid\nnameserver 10.1.0.1\n" + TAIL


def test_no_dns_settings_leave_resolv_conf_alone(tmp_path: Path) -> None:
    root = make_rootfs(tmp_path)
    (root / "etc/resolv.conf").write_text("nameserver 192.0.2.53\n")
    written = pct_setup(root, hostname="localhost", nets=[PveNet()], nameserver=None, searchdomain=None)
    assert (root / "etc/resolv.conf").read_text() == "nameserver 192.0.2.53\n"
    assert "etc/resolv.conf" not in written
    assert text(root, "etc/hosts").endswith("127.0.1.1 localhost\n" + TAIL)


def test_dns_falls_back_to_the_hosts_resolv_conf(tmp_path: Path) -> None:
    root = make_rootfs(tmp_path)
    host = tmp_path / "host-resolv.conf"
    host.write_text("domain lan.invalid\nnameserver 192.0.2.1\nnameserver 192.0.2.2\nnameserver 192.0.2.3\n"
                    "nameserver 192.0.2.4\n")
    pct_setup(root, hostname="ct1", nets=[PveNet()], nameserver=None, searchdomain=None, host_resolv_conf=host)
    assert text(root, "etc/resolv.conf") == (HEAD + "search lan.invalid\nnameserver 192.0.2.1\nnameserver 192.0.2.2\n"
                                             "nameserver 192.0.2.3\n" + TAIL)


def test_resolv_conf_symlink_out_of_the_rootfs_is_not_written_through(tmp_path: Path) -> None:
    root = make_rootfs(tmp_path)
    outside = tmp_path / "host-etc" / "passwd"
    outside.parent.mkdir()
    outside.write_text("root:x:0:0:root:/root:/bin/bash\n")
    outside.chmod(0o600)
    before = outside.stat()
    (root / "etc/resolv.conf").unlink()
    (root / "etc/resolv.conf").symlink_to(outside)          # absolute, to a file on the host
    pct_setup(root, hostname="ct1", nets=[PveNet()], **DNS)
    assert outside.read_text() == "root:x:0:0:root:/root:/bin/bash\n"
    assert (outside.stat().st_mtime_ns, stat.S_IMODE(outside.stat().st_mode)) == (before.st_mtime_ns, 0o600)
    # Inside the container the link dangles, so PVE writes its section alone over the link.
    assert text(root, "etc/resolv.conf") == HEAD + "search test.invalid\nnameserver 10.1.0.1\n" + TAIL


def test_relative_symlink_climbing_out_is_clamped_to_the_rootfs(tmp_path: Path) -> None:
    root = make_rootfs(tmp_path)
    outside = tmp_path / "hosts"
    outside.write_text("127.0.0.1 host\n")
    (root / "etc/hosts").symlink_to("../../../../../../hosts")   # on the host: tmp_path/hosts; in the CT: /hosts
    pct_setup(root, hostname="ct1", nets=[PveNet()], **DNS)
    assert outside.read_text() == "127.0.0.1 host\n"
    assert not (root / "etc/hosts").is_symlink()
    assert text(root, "etc/hosts").startswith(HEAD + "127.0.0.1 localhost.localnet localhost\n")


def test_resolv_conf_stub_symlink_is_read_inside_and_replaced(tmp_path: Path) -> None:
    root = make_rootfs(tmp_path)
    stub = root / "run/systemd/resolve/stub-resolv.conf"
    stub.parent.mkdir(parents=True)
    stub.write_text("nameserver 127.0.0.53\n")
    (root / "etc/resolv.conf").unlink()
    (root / "etc/resolv.conf").symlink_to("../run/systemd/resolve/stub-resolv.conf")
    pct_setup(root, hostname="ct1", nets=[PveNet()], **DNS)
    assert stub.read_text() == "nameserver 127.0.0.53\n"
    assert text(root, "etc/resolv.conf") == HEAD + "search test.invalid\nnameserver 10.1.0.1\n" + TAIL


def test_symlinked_directory_out_of_the_rootfs_is_never_entered(tmp_path: Path) -> None:
    root = make_rootfs(tmp_path)
    host_dir = tmp_path / "host-network"
    host_dir.mkdir()
    (host_dir / "interfaces").write_text("# the host's\n")
    (root / "etc/network/interfaces").unlink()
    (root / "etc/network").rmdir()
    (root / "etc/network").symlink_to(host_dir)             # /tmp/... does not exist inside the container
    with pytest.raises(FileNotFoundError):
        pct_setup(root, hostname="ct1", nets=[PveNet()], **DNS)
    assert sorted(p.name for p in host_dir.iterdir()) == ["interfaces"]
    assert (host_dir / "interfaces").read_text() == "# the host's\n"


def test_pve_ignore_file_protects_a_file(tmp_path: Path) -> None:
    root = make_rootfs(tmp_path)
    (root / "etc/.pve-ignore.hostname").write_text("")
    pct_setup(root, hostname="ct1", nets=[PveNet()], **DNS)
    assert (root / "etc/hostname").read_text() == "localhost\n"


def test_debian_9_gets_address_and_netmask_and_no_preset(tmp_path: Path) -> None:
    root = make_rootfs(tmp_path, debian_version="9.13")
    pct_setup(root, hostname="ct1", nets=[PveNet(ip="10.1.0.51/24", gw="10.1.0.1")], **DNS)
    assert text(root, "etc/network/interfaces").endswith(
        "iface eth0 inet static\n\taddress 10.1.0.51\n\tnetmask 255.255.255.0\n\tgateway 10.1.0.1\n\n")
    assert not (root / "etc/systemd/system-preset").exists()


def test_snakeoil_key_is_replaced_by_a_first_boot_unit(tmp_path: Path) -> None:
    root = make_rootfs(tmp_path)
    key = root / "etc/ssl/private/ssl-cert-snakeoil.key"
    key.parent.mkdir(parents=True)
    key.write_text("-----BEGIN PRIVATE KEY-----\n")
    pct_setup(root, hostname="ct1", nets=[PveNet()], **DNS)
    assert not key.exists()
    unit = text(root, "etc/systemd/system/proxmox-regenerate-snakeoil.service")
    assert "ConditionFirstBoot=yes\n" in unit and "ExecStart=make-ssl-cert -f generate-default-snakeoil\n" in unit
    link = root / "etc/systemd/system/first-boot-complete.target.wants/proxmox-regenerate-snakeoil.service"
    assert os.readlink(link) == "/etc/systemd/system/proxmox-regenerate-snakeoil.service"


@pytest.mark.parametrize("kwargs, message", [
    (dict(hostname="bad_name", nets=[PveNet()]), "DNS name"),
    (dict(hostname="ct1", nets=[PveNet(ip="dhcp", gw="10.0.0.1")]), "static"),
    (dict(hostname="ct1", nets=[PveNet(ip="10.0.0.5")]), "A.B.C.D/N"),
    (dict(hostname="ct1", nets=[PveNet(ip="10.0.0.5/33")]), "10.0.0.5/33"),
    (dict(hostname="ct1", nets=[PveNet(), PveNet()]), "twice"),
    (dict(hostname="ct1", nets=[PveNet(name="eth0 up")]), "interface name"),
])
def test_bad_arguments_raise_value_error_and_write_nothing(tmp_path: Path, kwargs: dict, message: str) -> None:
    root = make_rootfs(tmp_path)
    before = snapshot(root)
    with pytest.raises(ValueError, match=message):
        pct_setup(root, nameserver=None, searchdomain=None, **kwargs)
    assert snapshot(root) == before


def test_other_distributions_are_refused(tmp_path: Path) -> None:
    root = make_rootfs(tmp_path)
    (root / "usr/lib/os-release").write_text("ID=ubuntu\n")
    with pytest.raises(ValueError, match="ubuntu"):
        pct_setup(root, hostname="ct1", nets=[PveNet()], **DNS)
    with pytest.raises(ValueError, match="not a directory|No such file"):
        pct_setup(tmp_path / "missing", hostname="ct1", nets=[PveNet()], **DNS)


def test_lxc_config_lines() -> None:
    nets = [PveNet(name="eth0", ip="dhcp"), PveNet(name="eth1", ip="10.1.0.51/24", gw="10.1.0.1")]
    assert lxc_config_lines("ct1", nets, "tbpro0") == [
        "lxc.apparmor.profile = generated",
        "lxc.apparmor.raw = deny mount -> /proc/,",
        "lxc.apparmor.raw = deny mount -> /sys/,",
        "lxc.tty.max = 2",
        "lxc.environment = TERM=linux",
        "lxc.uts.name = ct1",
        "lxc.net.0.type = veth",
        "lxc.net.0.link = tbpro0",
        "lxc.net.0.name = eth0",
        "lxc.net.1.type = veth",
        "lxc.net.1.link = tbpro0",
        "lxc.net.1.name = eth1",
    ]
    unpriv = lxc_config_lines("ct1", nets[:1], "tbpro0", unprivileged=True)
    assert unpriv[:8] == [
        "lxc.include = /usr/share/lxc/config/debian.common.conf",
        "lxc.include = /usr/share/lxc/config/debian.userns.conf",
        "lxc.apparmor.profile = generated",
        "lxc.apparmor.raw = deny mount -> /proc/,",
        "lxc.apparmor.raw = deny mount -> /sys/,",
        "lxc.mount.auto = sys:mixed",
        "lxc.idmap = u 0 100000 65536",
        "lxc.idmap = g 0 100000 65536",
    ]
    priv = lxc_config_lines("ct1", nets[:1], "tbpro0", unprivileged=False, nesting=True)
    assert priv[:3] == ["lxc.include = /usr/share/lxc/config/debian.common.conf",
                        "lxc.apparmor.profile = generated", "lxc.apparmor.allow_nesting = 1"]
    assert not any(ln.startswith(("lxc.net.0.flags", "lxc.net.0.hwaddr", "lxc.rootfs", "lxc.arch")) for ln in priv)
    with pytest.raises(ValueError):
        lxc_config_lines("ct1", nets, "a bridge")
