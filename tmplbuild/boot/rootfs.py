"""Unpacking a template for a throwaway container, the way the hosts do, and reading what it ships."""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from tmplbuild.builder.mirror import parse_deb822, parse_one_line
from tmplbuild.errors import LocalIOError, UsageError
from tmplbuild.foreign import elf_arch
from tmplbuild.run import CLEAN_ENV, command_line

# pct's own extraction flags (PVE::LXC::Create::restore_archive): numeric owners, capabilities kept.
TAR_FLAGS = ["--numeric-owner", "-p", "--xattrs", "--xattrs-include=security.capability",
             "--warning=no-xattr-write", "--warning=no-unknown-keyword"]


def decompressor(artifact: Path) -> str:
    name = artifact.name
    if name.endswith(".oci.tar"):
        return "--gzip"  # the image's one layer (tmplbuild.oci.image), read out of the oci-archive
    if name.endswith(".tar.zst"):
        return "--zstd"
    if name.endswith(".tar.xz"):
        return "--xz"
    if name.endswith(".tar.gz"):
        return "--gzip"
    raise UsageError("artifact", f"{artifact}: found {name!r}, expected a .tar.zst, .tar.xz or .tar.gz template, "
                                 "or an .oci.tar image")


def _tar(argv: list[str], artifact: Path) -> subprocess.CompletedProcess[bytes]:
    """Run `argv` (a tar reading the archive on standard input) on the template: the file itself, or for an
    oci-archive the bytes of its one layer, as an OCI runtime unpacks the image (the outer tar is plain, so the
    layer is one contiguous range of it)."""
    with open(artifact, "rb") as src:
        if not artifact.name.endswith(".oci.tar"):
            return subprocess.run(argv, stdin=src, capture_output=True, env=CLEAN_ENV)
        from tmplbuild.oci.image import layer_range

        offset, size = layer_range(artifact)
        # Its output into files, not pipes: this thread feeds tar's standard input until the layer ends.
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=out, stderr=err, env=CLEAN_ENV)
            _feed(src, offset, size, proc.stdin)
            proc.wait()
            out.seek(0)
            err.seek(0)
            return subprocess.CompletedProcess(argv, proc.returncode, out.read(), err.read())


def _feed(src, offset: int, size: int, sink) -> None:
    try:
        src.seek(offset)
        while size > 0 and (chunk := src.read(min(size, 1 << 20))):
            sink.write(chunk)
            size -= len(chunk)
    except (BrokenPipeError, ValueError, OSError):
        pass  # tar stopped reading: its exit code and message say why
    finally:
        try:
            sink.close()
        except OSError:
            pass


def unpack(artifact: Path, dest: Path, *, uid_offset: int = 0, log: Path | None = None) -> None:
    """Unpack `artifact` into the new directory `dest`. With `uid_offset`, owners are shifted into an
    unprivileged container's range by extracting inside a user namespace mapped there (newuidmap decides whether
    root may use that range, as it does for LXC itself), so set-id bits and capabilities come out right. The
    archive is read on standard input, opened here: the mapped root need not reach its directory."""
    dest.mkdir(mode=0o755)
    argv = ["tar", decompressor(artifact), "-x", "-f", "-", "-C", str(dest), *TAR_FLAGS]
    if uid_offset:
        os.chown(dest, uid_offset, uid_offset)
        argv = ["unshare", "--user", f"--map-users={uid_offset},0,65536", f"--map-groups={uid_offset},0,65536",
                "--setuid", "0", "--setgid", "0", *argv]
    proc = _tar(argv, artifact)
    if (error := _logged(proc, f"{command_line(argv)} < {artifact}", log)) is not None:
        raise UsageError("unpack", f"{artifact.name}: `tar` exited {proc.returncode}: {error}")


def _logged(proc: subprocess.CompletedProcess[bytes], what: str, log: Path | None) -> str | None:
    """Append the command line `what` and its output to `log`; the first line it printed on failure, else None."""
    if log is not None:
        with open(log, "ab") as f:
            f.write(f"$ {what}\n".encode() + proc.stdout + proc.stderr)
    if proc.returncode == 0:
        return None
    lines = [ln for ln in proc.stderr.decode(errors="replace").splitlines() if ln.strip()]
    return (lines or ["no output"])[0][:300]


class SharedUnpack:
    """One unpack of the template per owner mapping, copied for each container: the containers of the managers
    that share a mapping (uid 0: nspawn, lxc, proxmox-privileged; root's subordinate range: lxc-unprivileged,
    proxmox) start from the same tree, and each gets a copy of its own to change. `cp -a` keeps what the unpack
    made: owners, modes, times, hard links, devices and the capability xattrs. The last container a tree is
    counted for (`uses`) takes the tree itself. An unpack that failed fails every container that needs it, with
    the same error."""

    def __init__(self, artifact: Path, workdir: Path, uses: dict[int, int] | None = None) -> None:
        self.artifact = artifact
        self.workdir = workdir
        self.uses = dict(uses or {})
        self.lock = threading.Condition()
        self.locks: dict[int, threading.Lock] = {}
        self.trees: dict[int, Path | BaseException] = {}
        self.copying: dict[int, int] = {}  # copies of each tree under way

    def tree(self, uid_offset: int, log: Path | None = None) -> Path:
        """The unpacked template for `uid_offset`, made by the first caller; the others wait for it."""
        with self.lock:
            lock = self.locks.setdefault(uid_offset, threading.Lock())
        with lock:
            if uid_offset not in self.trees:
                dest = self.workdir / f"template-{uid_offset}" / "rootfs"
                dest.parent.mkdir(mode=0o711)
                try:
                    unpack(self.artifact, dest, uid_offset=uid_offset, log=log)
                    self.trees[uid_offset] = dest
                except Exception as exc:  # noqa: BLE001 - kept for every container that needs this tree
                    self.trees[uid_offset] = exc
        tree = self.trees[uid_offset]
        if isinstance(tree, BaseException):
            raise tree
        return tree

    def copy(self, dest: Path, uid_offset: int = 0, log: Path | None = None) -> None:
        """A container's own copy of the unpacked template at the new directory `dest`. Raises as unpack does,
        and LocalIOError when the copy fails (the work directory full)."""
        tree = self.tree(uid_offset, log)
        with self.lock:
            self.uses[uid_offset] = left = self.uses.get(uid_offset, 0) - 1
            if left == 0:  # no one copies from it after this one: the tree itself, once the copies under way end
                while self.copying.get(uid_offset):
                    self.lock.wait()
                os.rename(tree, dest)
                return
            self.copying[uid_offset] = self.copying.get(uid_offset, 0) + 1
        argv = ["cp", "-a", "--no-target-directory", str(tree), str(dest)]
        try:
            proc = subprocess.run(argv, capture_output=True, env=CLEAN_ENV)
        finally:
            with self.lock:
                self.copying[uid_offset] -= 1
                self.lock.notify_all()
        if (error := _logged(proc, command_line(argv), log)) is not None:
            raise LocalIOError("unpack", f"copying the unpacked template to {dest}: {error}")


def traversal_problem(path: Path) -> str | None:
    """Why an unprivileged container's root (a mapped uid, not root) cannot reach `path`, or None."""
    for p in [path, *path.parents]:
        mode = p.stat().st_mode
        if not mode & 0o001:
            return f"{p} (mode {mode & 0o777:o}) is not searchable by the container's mapped root; use --work-dir elsewhere"
    return None


@dataclass(frozen=True)
class TemplateFacts:
    """What the checks need to know about the template itself, read from one unpacked copy."""

    machine_id: str
    has_sshd: bool
    sources: list[tuple[str, list[str]]]
    os_release: dict[str, str]
    arch: str | None = None  # the Debian architecture of its dpkg binary (tmplbuild.foreign.elf_arch)


def read_facts(rootfs: Path) -> TemplateFacts:
    rootfs = rootfs.resolve()
    machine_id = _read(rootfs / "etc/machine-id").strip()
    sources: list[tuple[str, list[str]]] = []
    apt = rootfs / "etc/apt"
    sources += list(parse_one_line(_read(apt / "sources.list")))
    listd = apt / "sources.list.d"
    if listd.is_dir() and Path(os.path.realpath(listd)) == listd:
        for path in sorted(listd.iterdir()):
            if path.name.endswith(".list"):
                sources += list(parse_one_line(_read(path)))
            elif path.name.endswith(".sources"):
                sources += list(parse_deb822(_read(path)))
    os_release = {}
    for line in _read(rootfs / "usr/lib/os-release").splitlines():
        m = re.fullmatch(r'([A-Z_]+)="?(.*?)"?', line.strip())
        if m:
            os_release[m.group(1)] = m.group(2)
    sshd = rootfs / "usr/sbin/sshd"
    dpkg = rootfs / "usr/bin/dpkg"
    arch = elf_arch(dpkg) if Path(os.path.realpath(dpkg)) == dpkg else None
    return TemplateFacts(machine_id=machine_id, has_sshd=sshd.is_file() and not sshd.is_symlink(),
                         sources=sources, os_release=os_release, arch=arch)


def _read(path: Path) -> str:
    # A template is untrusted input here: never follow its symlinks out of the tree.
    # `path` is absolute under the resolved rootfs: any symlink on the way makes realpath differ.
    real = Path(os.path.realpath(path))
    if real != path or not real.is_file():
        return ""
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""
