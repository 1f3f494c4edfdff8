"""The containers of one `tmplbuild test` run start from one unpack of the template per owner mapping
(tmplbuild.boot.rootfs.SharedUnpack): each container's copy must be what its own unpack would have made, or a
template that works only when unpacked (a capability, a hard link, a device, a set-id bit) would pass or fail
for the wrong reason."""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
import threading
from pathlib import Path

import pytest

from tmplbuild.boot.managers import UNPRIVILEGED_BASE, subordinate_range_problem
from tmplbuild.boot.rootfs import SharedUnpack, unpack
from tmplbuild.errors import UsageError

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="unpacking with owners and devices needs root")


@pytest.fixture
def template(tmp_path: Path) -> Path:
    return make_template(tmp_path)


def make_template(tmp_path: Path, device: bool = True) -> Path:
    """A small template tar.zst with what a plain copy can lose: a file capability, a hard link pair, a set-uid
    file, a character device (not for an unprivileged unpack, which may not make one), a FIFO, a symlink, owners
    other than root, and old mtimes."""
    root = tmp_path / "src"
    (root / "usr/bin").mkdir(parents=True)
    (root / "etc").mkdir()
    ping = root / "usr/bin/ping"
    ping.write_bytes(b"\x7fELF not really\n")
    ping.chmod(0o755)
    subprocess.run(["setcap", "cap_net_raw+ep", str(ping)], check=True)
    su = root / "usr/bin/su"
    su.write_bytes(b"su\n")
    su.chmod(0o4755)
    (root / "usr/bin/a").write_bytes(b"linked\n")
    os.link(root / "usr/bin/a", root / "usr/bin/b")
    (root / "etc/owned").write_text("by 101:102\n")
    os.chown(root / "etc/owned", 101, 102)
    os.symlink("../usr/bin/a", root / "etc/link")
    (root / "dev").mkdir()
    if device:
        os.mknod(root / "dev/null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.mkfifo(root / "etc/fifo")
    for p in sorted(root.rglob("*"), reverse=True):
        os.utime(p, (1_600_000_000, 1_600_000_000), follow_symlinks=False)
    out = tmp_path / "t_1_amd64.tar.zst"
    subprocess.run(["tar", "--zstd", "-cf", str(out), "--numeric-owner", "--xattrs", "--xattrs-include=*",
                    "-C", str(root), "."], check=True)
    return out


def snapshot(root: Path) -> dict[str, tuple]:
    """Everything about a tree a container sees, hard links as groups of names."""
    out: dict[str, tuple] = {}
    inodes: dict[int, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            p = Path(dirpath) / name
            st = os.lstat(p)
            rel = str(p.relative_to(root))
            try:
                cap = os.getxattr(p, "security.capability", follow_symlinks=False)
            except OSError:
                cap = None
            data = p.read_bytes() if stat.S_ISREG(st.st_mode) else os.readlink(p) if stat.S_ISLNK(st.st_mode) else None
            first = inodes.setdefault(st.st_ino, rel) if stat.S_ISREG(st.st_mode) and st.st_nlink > 1 else None
            out[rel] = (st.st_mode, st.st_uid, st.st_gid, st.st_rdev, int(st.st_mtime), cap, data, first)
    return out


def test_every_copy_is_what_its_own_unpack_makes(template: Path, tmp_path: Path):
    own = tmp_path / "own"
    unpack(template, own)
    trees = SharedUnpack(template, tmp_path, {0: 3})
    copies = [tmp_path / f"c{i}" for i in range(3)]
    threads = [threading.Thread(target=trees.copy, args=(c,)) for c in copies]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    expected = snapshot(own)
    assert expected["usr/bin/ping"][5] is not None, "the fixture's capability did not survive tar"
    for c in copies:
        assert snapshot(c) == expected, c
    # The third took the tree itself: no fourth copy of it stays in the work directory.
    assert not (tmp_path / "template-0" / "rootfs").exists()
    # Copies are their own: what one container changes, the others do not see.
    (copies[0] / "usr/bin/a").write_text("changed\n")
    assert (copies[1] / "usr/bin/a").read_text() == "linked\n"


@pytest.fixture
def searchable():
    """A work directory the mapped root of an unprivileged unpack can reach (pytest's own are 0700)."""
    path = Path(tempfile.mkdtemp(prefix="tmplbuild-pytest-", dir="/var/tmp"))
    path.chmod(0o711)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.skipif(subordinate_range_problem() is not None, reason=str(subordinate_range_problem()))
def test_an_unprivileged_copy_keeps_the_shifted_owners_and_capability(searchable: Path):
    template = make_template(searchable, device=False)
    own = searchable / "own"
    unpack(template, own, uid_offset=UNPRIVILEGED_BASE)
    trees = SharedUnpack(template, searchable, {UNPRIVILEGED_BASE: 2})
    first, second = searchable / "u1", searchable / "u2"
    trees.copy(first, UNPRIVILEGED_BASE)
    trees.copy(second, UNPRIVILEGED_BASE)
    expected = snapshot(own)
    assert expected["etc/owned"][1:3] == (UNPRIVILEGED_BASE + 101, UNPRIVILEGED_BASE + 102)
    assert os.stat(own).st_uid == UNPRIVILEGED_BASE
    assert expected["usr/bin/ping"][5] is not None, "the capability did not survive the unprivileged unpack"
    for tree in (first, second):
        assert snapshot(tree) == expected
        assert os.stat(tree).st_uid == UNPRIVILEGED_BASE


def test_a_template_that_does_not_unpack_fails_every_container_once(tmp_path: Path):
    bad = tmp_path / "bad_1_amd64.tar.zst"
    bad.write_bytes(b"\x28\xb5\x2f\xfd" + b"not a zstd frame" * 100)
    trees = SharedUnpack(bad, tmp_path, {0: 2})
    log = tmp_path / "log"
    errors = []
    for dest in (tmp_path / "a", tmp_path / "b"):
        with pytest.raises(UsageError) as exc:
            trees.copy(dest, 0, log)
        errors.append(str(exc.value))
        assert not dest.exists()
    assert errors[0] == errors[1] and "unpack" in errors[0]
    assert log.read_text().count("$ tar ") == 1  # unpacked once, the failure shared
