"""The deterministic tar and its compression: what makes two builds bit-identical, and readable by tar."""
from __future__ import annotations

import hashlib
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from tests.conftest import fill, small_disk  # noqa: F401 - fixture
from tmplbuild.builder.pack import pack, write_tar
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
    with open(tmp_path / "a.tar", "wb") as fa, open(tmp_path / "b.tar", "wb") as fb:
        write_tar(a, fa, EPOCH)
        write_tar(b, fb, EPOCH)
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()


def test_entries_sorted_clamped_numeric_owners_and_hardlinks(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    make_tree(root, EPOCH + 5.5)
    with open(tmp_path / "t.tar", "wb") as f:
        entries, _ = write_tar(root, f, EPOCH)
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


def test_both_formats_from_one_stream_unpack_with_plain_tar_and_match_the_plain_tar(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    make_tree(root, EPOCH)
    with open(tmp_path / "t.tar", "wb") as f:
        write_tar(root, f, EPOCH)
    outputs = [(Compression.ZSTD, tmp_path / "t.tar.zst"), (Compression.XZ, tmp_path / "t.tar.xz")]
    entries, content, artifacts = pack(root, outputs, EPOCH)
    assert entries == 11 and content == 1000 + 2 + 2 + 15
    for art, flag in zip(artifacts, ("--zstd", "--xz")):
        data = art.path.read_bytes()
        assert art.size == len(data) and art.sha256 == hashlib.sha256(data).hexdigest() and len(art.sha512) == 128
        plain = subprocess.run(["tar", flag, "-xOf", str(art.path), "./etc/b/c"], capture_output=True, check=True)
        assert plain.stdout == b"c\n"
        decompressed = subprocess.run(["zstd" if flag == "--zstd" else "xz", "-dc", str(art.path)],
                                      capture_output=True, check=True).stdout
        assert decompressed == (tmp_path / "t.tar").read_bytes()  # exactly the deterministic tar


def test_a_write_failure_mid_pack_leaves_no_output(tmp_path, monkeypatch):
    import tmplbuild.builder.pack as pack_module
    from tmplbuild.errors import LocalIOError

    root = tmp_path / "root"
    root.mkdir()
    make_tree(root, EPOCH)

    def open_failing_on_tool(path, *args, **kwargs):
        if str(path).endswith("usr/bin/tool"):  # half-way through the walk: the outputs are partly written
            raise OSError(28, "No space left on device", str(path))
        return open(path, *args, **kwargs)

    monkeypatch.setattr(pack_module, "open", open_failing_on_tool, raising=False)
    outputs = [(Compression.ZSTD, tmp_path / "out.tar.zst"), (Compression.XZ, tmp_path / "out.tar.xz")]
    with pytest.raises(LocalIOError, match="No space left on device"):
        pack(root, outputs, EPOCH)
    assert list(tmp_path.glob("out.*")) == []


def test_a_full_disk_under_xz_is_reported_as_the_full_disk_not_a_broken_pipe(tmp_path, small_disk):
    """xz writes the .tar.xz itself: when the disk fills, xz exits and the next write into its pipe fails with
    EPIPE. The error must name the full disk, as xz reported it, with exit 7 and no partial output."""
    from tmplbuild.errors import LocalIOError

    root = tmp_path / "root"
    root.mkdir()
    make_tree(root, EPOCH)
    (root / "big").write_bytes(os.urandom(8 << 20))  # past xz -0's 1 MiB blocks and the pipe's buffer
    fill(small_disk, leave=64 << 10)
    dest = small_disk / "out.tar.xz"
    with pytest.raises(LocalIOError, match="No space left on device") as exc:
        pack(root, [(Compression.XZ, dest)], EPOCH, xz_level=0)
    assert "Broken pipe" not in str(exc.value) and exc.value.exit_code == 7
    assert not dest.exists()
