"""Running another architecture's binaries on this host: the kernel's binfmt_misc handing them to qemu-user.

A build of a foreign architecture runs debootstrap's dpkg and the recipe's scripts in a chroot of that
architecture, and `tmplbuild test` boots it, both through the binfmt entry Debian's qemu-user-static registers.
That entry must carry the fix-binary flag `F`: the kernel then opens the interpreter once, at registration,
and a chroot or a container needs no copy of it inside (nothing of the emulator ever reaches a template).
"""
from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tmplbuild.errors import EnvironmentUnfitError
from tmplbuild.run import CLEAN_ENV, host_arch

def binfmt_dir() -> Path:
    """Where binfmt_misc is mounted: $TMPLBUILD_BINFMT_DIR (a host that mounts it elsewhere; the tests, which
    give a directory of their own entries), else /proc/sys/fs/binfmt_misc."""
    return Path(os.environ.get("TMPLBUILD_BINFMT_DIR") or "/proc/sys/fs/binfmt_misc")
# Debian architecture -> the qemu-user target (binfmt entry qemu-<cpu>, interpreter qemu-<cpu>-static).
QEMU_CPU = {"arm64": "aarch64", "armhf": "arm", "armel": "arm", "riscv64": "riscv64", "ppc64el": "ppc64le",
            "s390x": "s390x", "mips64el": "mips64el", "mipsel": "mipsel", "i386": "i386", "amd64": "x86_64"}
# What a 64-bit host runs without an emulator (the kernel's 32-bit compatibility mode).
NATIVE = {"amd64": {"amd64", "i386"}, "arm64": {"arm64", "armhf", "armel"}}
# The oldest qemu-user known to boot a template of this architecture to `running`: systemd 257 (Debian 13, the
# first release with riscv64) uses system calls and sandboxing qemu 7.2 does not emulate.
BOOT_QEMU = {"riscv64": (10, 0)}
INSTALL = "apt-get install qemu-user-static binfmt-support"
# ELF e_machine (and, for 32-bit arm, nothing more is needed to tell armhf from armel here: both run the same way)
ELF_MACHINES = {62: "amd64", 3: "i386", 183: "arm64", 40: "armhf", 243: "riscv64", 21: "ppc64el", 22: "s390x",
                8: "mips64el"}  # EM_MIPS: mips64el and mipsel alike; only amd64, arm64 and armhf are tested


class CannotRun(EnvironmentUnfitError):
    """This host cannot run the architecture's binaries (exit 2); `why` names what is missing."""

    def __init__(self, arch: str, why: str) -> None:
        super().__init__("arch", f"this host cannot run {arch} binaries: {why}")
        self.arch = arch
        self.why = why


@dataclass(frozen=True)
class Emulator:
    arch: str
    entry: Path            # /proc/sys/fs/binfmt_misc/qemu-<cpu>
    interpreter: Path
    flags: str

    def version(self) -> tuple[int, int] | None:
        """qemu's version, from `<interpreter> --version`, or None when it does not say."""
        # Debian's entry names a -binfmt-P link, which refuses to run outside binfmt_misc: ask what it points to.
        try:
            out = subprocess.run([str(self.interpreter.resolve()), "--version"], capture_output=True, text=True,
                                 timeout=10, env=CLEAN_ENV).stdout
        except (OSError, subprocess.TimeoutExpired):
            return None
        m = re.search(r"version (\d+)\.(\d+)", out)
        return (int(m.group(1)), int(m.group(2))) if m else None


def is_foreign(arch: str, host: str | None = None) -> bool:
    host = host or host_arch() or ""
    return arch not in NATIVE.get(host, {host})


def emulator(arch: str, host: str | None = None) -> Emulator | None:
    """The binfmt entry that runs `arch` here, or None when the host runs it natively. Raises
    CannotRun (an EnvironmentUnfitError: exit 2) naming what is missing and how to install it."""
    if not is_foreign(arch, host):
        return None
    cpu = QEMU_CPU.get(arch)
    if cpu is None:
        raise CannotRun(arch, "no qemu-user target is known for it")
    binfmt = binfmt_dir()
    if not (binfmt / "status").exists():
        raise CannotRun(arch, f"binfmt_misc is not mounted at {binfmt} (mount -t binfmt_misc binfmt_misc {binfmt}, "
                              "then update-binfmts --enable)")
    entry = binfmt / f"qemu-{cpu}"
    try:
        text = entry.read_text()
    except OSError:
        raise CannotRun(arch, f"no binfmt_misc entry qemu-{cpu} ({INSTALL}; then update-binfmts --enable)") from None
    fields = dict(line.split(" ", 1) if " " in line else (line, "") for line in text.splitlines())
    if "enabled" not in fields:
        raise CannotRun(arch, f"the binfmt_misc entry qemu-{cpu} is disabled (update-binfmts --enable qemu-{cpu})")
    interpreter = Path(fields.get("interpreter", "").strip())
    flags = fields.get("flags:", "").strip()
    if "F" not in flags:
        raise CannotRun(arch, f"the binfmt_misc entry qemu-{cpu} lacks the fix-binary flag F (flags: {flags or 'none'}), "
                              f"so a chroot cannot reach {interpreter}; Debian's qemu-user-static registers it with F "
                              f"({INSTALL})")
    return Emulator(arch=arch, entry=entry, interpreter=interpreter, flags=flags)


def boot_problem(arch: str, host: str | None = None) -> str | None:
    """Why a template of `arch` cannot be booted here (by name: the missing entry, or a qemu too old), or None."""
    try:
        emu = emulator(arch, host)
    except CannotRun as exc:
        return exc.message
    if emu is None or arch not in BOOT_QEMU:
        return None
    need = BOOT_QEMU[arch]
    have = emu.version()
    if have is None or have < need:
        return (f"{arch} templates do not boot under qemu-user {'.'.join(map(str, have)) if have else '(unknown)'} "
                f"({emu.interpreter}); qemu {need[0]}.{need[1]} or later runs them")
    return None


def elf_arch(path: Path) -> str | None:
    """The Debian architecture of an ELF executable, from its header, or None."""
    try:
        with open(path, "rb") as f:
            head = f.read(20)
    except OSError:
        return None
    if len(head) < 20 or head[:4] != b"\x7fELF":
        return None
    order = "little" if head[5] == 1 else "big"
    return ELF_MACHINES.get(int.from_bytes(head[18:20], order))

