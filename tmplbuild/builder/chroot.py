"""Running recipe scripts inside the tree: /proc, /sys and /dev mounted, daemons kept from starting, and every
mount undone on success, failure and Ctrl-C. The build also runs in its own mount namespace where the kernel
allows it, so even a SIGKILL cannot leave a mount behind on the host."""
from __future__ import annotations

import ctypes
import os
import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from tmplbuild.errors import BuildError
from tmplbuild.recipe.model import Script
from tmplbuild.run import run

CLONE_NEWNS = 0x00020000
POLICY_RC_D = b"#!/bin/sh\n# tmplbuild: no daemon starts while a template is built\nexit 101\n"


def enter_private_mount_namespace() -> bool:
    """Move this process into a new mount namespace whose mounts do not propagate to the host. Must be called
    before any thread starts (unshare(CLONE_NEWNS) fails in a multithreaded process). Returns False where the
    kernel refuses; the explicit unmounts below still clean up then."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNS) != 0:
        return False
    run(["mount", "--make-rprivate", "/"], check="mount namespace", capture=True)
    return True


def mount(*argv: str | Path) -> None:
    run(["mount", *argv], check="mount", capture=True)


def umount(target: Path) -> None:
    try:
        run(["umount", target], check="umount", capture=True)
    except BuildError:
        # Something still holds it (a daemon a script started despite policy-rc.d): detach it lazily so the
        # tree can go; the namespace takes the rest with it when the build exits.
        run(["umount", "--lazy", target], check="umount", capture=True)


def mounts_under(root: Path) -> list[Path]:
    """Mount points at or below root, deepest first (the order to unmount them)."""
    found = []
    prefix = str(root.resolve())
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].encode().decode("unicode_escape")
            if point == prefix or point.startswith(prefix + "/"):
                found.append(Path(point))
    return sorted(found, key=lambda p: len(p.parts), reverse=True)


@contextmanager
def tmpfs(path: Path, size: str = "16g") -> Iterator[Path]:
    """A tmpfs at path for the build tree: dpkg's many small writes and fsyncs cost nothing there, which is
    most of debootstrap's time on a disk."""
    path.mkdir(parents=True, exist_ok=True)
    mount("-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", path)
    try:
        yield path
    finally:
        for point in mounts_under(path):
            umount(point)


@contextmanager
def chroot_mounts(root: Path) -> Iterator[None]:
    """/proc, /sys (read-only), /dev and /dev/pts inside the tree, plus policy-rc.d and the host's resolv.conf
    for apt. All undone on the way out, whatever happened."""
    policy = root / "usr/sbin/policy-rc.d"
    had_policy = policy.exists()
    resolv = root / "etc/resolv.conf"
    # What the tree had there (a link to systemd-resolved's stub, a file, nothing): put back afterwards unless a
    # script replaced the host's copy with something of its own.
    link = os.readlink(resolv) if resolv.is_symlink() else None
    before = resolv.read_bytes() if link is None and resolv.is_file() else None
    copied = None
    try:
        mount("-t", "proc", "proc", root / "proc")
        mount("-t", "sysfs", "-o", "ro", "sysfs", root / "sys")
        mount("--bind", "/dev", root / "dev")
        mount("--bind", "/dev/pts", root / "dev/pts")
        if not had_policy:
            policy.write_bytes(POLICY_RC_D)
            policy.chmod(0o755)
        if resolv.is_symlink():
            resolv.unlink()
        if Path("/etc/resolv.conf").exists():
            shutil.copyfile("/etc/resolv.conf", resolv)
            copied = os.stat(resolv).st_ino
        yield
    finally:
        for point in mounts_under(root):
            umount(point)
        if copied is not None and not resolv.is_symlink() and resolv.exists() and resolv.stat().st_ino == copied:
            resolv.unlink()
            if link is not None:
                resolv.symlink_to(link)
            elif before is not None:
                resolv.write_bytes(before)
        if not had_policy and policy.exists():
            policy.unlink()


def run_script(root: Path, script: Script, index: int, env: Mapping[str, str], log: Path) -> None:
    """Run one recipe script inside the chroot (mounts must be up). A script with a #! line is executed as
    is; any other runs under `/bin/sh -e`. Raises BuildError naming the stage and the script."""
    rundir = root / "run/tmplbuild"
    rundir.mkdir(parents=True, exist_ok=True)
    inside = f"/run/tmplbuild/{index:02d}-{script.stage.value}"
    path = root / inside.lstrip("/")
    path.write_bytes(script.content)
    path.chmod(0o755)
    argv = ["chroot", root, inside] if script.content.startswith(b"#!") else ["chroot", root, "/bin/sh", "-e", inside]
    try:
        run(argv, check=f"{script.stage.value} script {script.name}", env=env, log=log)
    finally:
        shutil.rmtree(rundir, ignore_errors=True)


def chroot_run(root: Path, argv: list[str], check: str, env: Mapping[str, str], log: Path) -> None:
    run(["chroot", root, *argv], check=check, env=env, log=log)


def is_root() -> bool:
    return os.geteuid() == 0
