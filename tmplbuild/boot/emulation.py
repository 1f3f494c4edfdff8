"""Booting another architecture's template under qemu-user (binfmt_misc), and what the harness changes for it.

qemu-user refuses clone(CLONE_NEWNS), which systemd uses to set up a unit's credentials: under emulation,
systemd-sysusers, systemd-tmpfiles-setup(-dev), systemd-sysctl and a few more fail with 243/CREDENTIALS and the
container comes up `degraded`. That is the emulator, not the template, so the fix belongs to the test harness:
a drop-in that resets those units' credentials is written into each throwaway container's own copy of the tree
before it boots, never into the template. Real-time signals are shifted by qemu, so an emulated container is
powered off with `systemctl poweroff` inside (tmplbuild.boot.managers.Manager.poweroff), and every deadline is
multiplied by SLOWDOWN."""
from __future__ import annotations

import os
from pathlib import Path

# Units whose credentials systemd 252 sets up in a mount namespace of their own (LoadCredential=/SetCredential=).
CREDENTIAL_UNITS = ("systemd-sysusers.service", "systemd-tmpfiles-setup.service",
                    "systemd-tmpfiles-setup-dev.service", "systemd-sysctl.service", "systemd-tmpfiles-clean.service",
                    "systemd-firstboot.service")
DROPIN = "zz-tmplbuild-test-qemu-user.conf"
DROPIN_TEXT = ("# Written by `tmplbuild test` into a throwaway container's copy of the template, never into a\n"
               "# template: qemu-user cannot set up a unit's credentials (clone(CLONE_NEWNS)).\n"
               "[Service]\nLoadCredential=\nSetCredential=\n")
# Deadlines (boot, DHCP grace, apt) under emulation: measured on arm64 here, boot and apt take 3 to 6 times as long.
SLOWDOWN = 5.0


def write_dropins(rootfs: Path, uid_offset: int = 0) -> list[str]:
    """The drop-ins in the container's copy at `rootfs` (owned by the container's root). Returns their paths."""
    written = []
    base = rootfs / "etc/systemd/system"
    for unit in CREDENTIAL_UNITS:
        d = base / f"{unit}.d"
        if d.is_symlink() or base.is_symlink():
            continue  # a template's symlink is not followed out of its tree
        d.mkdir(parents=True, exist_ok=True)
        path = d / DROPIN
        path.write_text(DROPIN_TEXT)
        for p in (d, path):
            os.chown(p, uid_offset, uid_offset)
        written.append(f"/{path.relative_to(rootfs)}")
    return written


# What qemu-user (7.2, and as far as its source shows, later ones too) cannot run, as a unit's last log line shows
# it: the reason a check names when it reports such a failure as the emulator's, not the template's.
NETLINK_REFUSED = "Protocol not supported"  # what networkd logs when qemu-user refuses its generic netlink socket
NETLINK = "qemu-user emulates no NETLINK_GENERIC socket, which systemd-networkd needs (\"Could not setup manager: " \
          "Protocol not supported\")"
SANDBOX = "qemu-user cannot set up the unit's sandbox (a unit's new namespaces: \"Failed at step {step}\")"
DHCP_REPLY = ("the test's DHCP server offered {ip} to {mac}, and the template's DHCP client never took it: under "
              "qemu-user the reply does not reach the client's packet socket")


def blame(unit: str, line: str, blamed: dict[str, str]) -> str | None:
    """Why qemu-user, not the template, failed `unit` (from its last log line), or None. `blamed`: the units
    already put down to the emulator (a socket unit fails with its service)."""
    if unit.startswith("systemd-networkd") and NETLINK_REFUSED in line:
        return NETLINK
    for step in ("NETWORK", "NAMESPACE", "CREDENTIALS"):
        if f"Failed at step {step}" in line or (step == "CREDENTIALS" and "243/CREDENTIALS" in line):
            return SANDBOX.format(step=step)
    if unit.endswith(".socket") and unit[: -len(".socket")] + ".service" in blamed:
        return "its service cannot run under qemu-user"
    return None


def dhcp_blocked(c, net, mac: str | None) -> str | None:
    """Why an emulated container has no lease for a reason outside the template, or None (then it is the
    template's: no DHCP client asked at all)."""
    offer = net.offer_for(mac) if mac else None
    if offer:
        return DHCP_REPLY.format(ip=offer, mac=mac)
    res = c.exec("journalctl", "--no-pager", "-o", "cat", "-u", "systemd-networkd.service", timeout=30)
    if NETLINK_REFUSED in res.out:
        return NETLINK
    return None
