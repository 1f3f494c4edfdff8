"""The deterministic tar and its compression: what makes two builds bit-identical, and readable by tar."""
from __future__ import annotations

import os
import subprocess
import tarfile
from pathlib import Path

from tmplbuild.build.pack import compress, write_tar
from tmplbuild.recipe.model import Compression

EPOCH = 1_700_000_000


def make_tree(root: Path, mtime: float) -> None:
    (root / "etc/b").mkdir(parents=True)
    (root / "etc/a.conf").write_text("a\n")
    (root / "etc/b/c").write_text("c\n")
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/bin/tool").write_bytes(b"\x00" * 1000)
    os.link(root / "usr/bin/tool", root / "usr/bin/tool-alias")
    (root / "bin").symlink_to("usr/bin")
    (root / "etc/shadow").write_text("root:*:1::::::\n")
    os.chown(root / "etc/shadow", 0, 42)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            os.utime(os.path.join(dirpath, name), (mtime, mtime), follow_symlinks=False)


def test_same_tree_gives_same_bytes_whatever_the_build_time(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    make_tree(a, EPOCH + 12345.678)  # files written during a build: newer than the epoch, float mtimes
    make_tree(b, EPOCH + 99999.5)
    write_tar(a, tmp_path / "a.tar", EPOCH)
    write_tar(b, tmp_path / "b.tar", EPOCH)
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()


def test_entries_sorted_clamped_numeric_owners_and_hardlinks(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    make_tree(root, EPOCH + 5.5)
    entries, _ = write_tar(root, tmp_path / "t.tar", EPOCH)
    with tarfile.open(tmp_path / "t.tar") as tar:
        members = tar.getmembers()
    names = [m.name for m in members]
    assert names == [".", "./bin", "./etc", "./etc/a.conf", "./etc/b", "./etc/b/c", "./etc/shadow", "./usr",
                     "./usr/bin", "./usr/bin/tool", "./usr/bin/tool-alias"]
    assert entries == len(members)
    assert all(m.mtime == EPOCH and m.uname == "" and m.gname == "" for m in members)
    shadow = members[names.index("./etc/shadow")]
    assert (shadow.uid, shadow.gid) == (0, 42)  # real group kept: forcing 0 breaks the shadow tools
    alias = members[names.index("./usr/bin/tool-alias")]
    assert alias.islnk() and alias.linkname == "./usr/bin/tool"
    assert members[names.index("./bin")].linkname == "usr/bin"
    # Integer mtimes: no pax header per file (a float mtime would add one).
    raw = (tmp_path / "t.tar").read_bytes()
    assert b"PaxHeader" not in raw and b"mtime=" not in raw


def test_compressed_formats_unpack_with_plain_tar(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    make_tree(root, EPOCH)
    write_tar(root, tmp_path / "t.tar", EPOCH)
    for fmt, flag in ((Compression.ZSTD, "--zstd"), (Compression.XZ, "--xz")):
        art = compress(tmp_path / "t.tar", tmp_path / f"t.{fmt.value}", fmt)
        assert art.size == (tmp_path / f"t.{fmt.value}").stat().st_size and len(art.sha512) == 128
        out = tmp_path / f"x-{fmt.name}"
        out.mkdir()
        subprocess.run(["tar", flag, "-xf", str(art.path), "-C", str(out)], check=True)
        assert (out / "etc/b/c").read_text() == "c\n"
