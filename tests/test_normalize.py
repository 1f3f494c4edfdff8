"""Clean-up of a tree into a template, and the private key scan."""
from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import pytest

from tmplbuild.builder.normalize import clean, find_private_keys, refuse_private_keys
from tmplbuild.errors import UnsafeContentError
from tests.conftest import gpg

EPOCH = 1_700_000_000  # 2023-11-14, day 19675


def make_tree(root: Path) -> None:
    files = {
        "etc/hostname": socket.gethostname() + "\n",
        "etc/ssh/ssh_host_ed25519_key": "x", "etc/ssh/ssh_host_ed25519_key.pub": "x", "etc/ssh/sshd_config": "keep",
        "etc/machine-id": "0123456789abcdef0123456789abcdef\n", "etc/resolv.conf": "nameserver 10.0.0.1\n",
        "etc/passwd-": "old", "var/log/dpkg.log": "log", "var/log/apt/history.log": "h",
        "var/log/wtmp": "entries", "var/cache/ldconfig/aux-cache": "c", "var/lib/apt/lists/m_Packages": "p",
        "var/cache/apt/archives/a_1_all.deb": "d", "var/lib/dpkg/status-old": "s", "tmp/x": "t", "dev/null": "n",
        "etc/shadow": "root:*:20780:0:99999:7:::\nnobody:*::0:99999:7:::\nold:*:100:0:99999:7:::\n",
    }
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    (root / "var/lib/apt/lists/partial").mkdir()


def test_clean_removes_what_must_be_unique_or_must_not_ship(tmp_path):
    make_tree(tmp_path)
    clean(tmp_path, EPOCH)
    assert not list(tmp_path.glob("etc/ssh/ssh_host_*"))
    assert (tmp_path / "etc/ssh/sshd_config").read_text() == "keep"
    assert (tmp_path / "etc/machine-id").read_bytes() == b""
    assert (tmp_path / "etc/resolv.conf").read_bytes() == b""
    # The build host's name is not the container's: without /etc/hostname the manager's name stays.
    assert not (tmp_path / "etc/hostname").exists()
    for gone in ("etc/passwd-", "var/log/dpkg.log", "var/log/apt/history.log", "var/cache/ldconfig/aux-cache",
                 "var/lib/apt/lists/m_Packages", "var/cache/apt/archives/a_1_all.deb", "var/lib/dpkg/status-old",
                 "tmp/x", "dev/null"):
        assert not (tmp_path / gone).exists(), gone
    assert (tmp_path / "var/log/wtmp").read_bytes() == b""  # kept, emptied
    assert (tmp_path / "var/lib/apt/lists/partial").is_dir()


def test_clean_keeps_a_resolver_link_and_a_hostname_the_recipe_chose(tmp_path):
    make_tree(tmp_path)
    (tmp_path / "etc/resolv.conf").unlink()
    (tmp_path / "etc/resolv.conf").symlink_to("../run/systemd/resolve/stub-resolv.conf")
    (tmp_path / "etc/hostname").write_text("appliance\n")
    clean(tmp_path, EPOCH)
    assert str((tmp_path / "etc/resolv.conf").readlink()) == "../run/systemd/resolve/stub-resolv.conf"
    assert (tmp_path / "etc/hostname").read_text() == "appliance\n"


def test_clean_marks_etc_and_var_updated_as_of_the_epoch_for_systemd(tmp_path):
    """No first-boot sysusers/ldconfig re-run: /usr is no newer than the epoch-stamped .updated files."""
    make_tree(tmp_path)
    clean(tmp_path, EPOCH)
    assert not (tmp_path / "etc/.updated").exists()  # no systemd in the tree: nothing to mark
    (tmp_path / "lib/systemd").mkdir(parents=True)
    (tmp_path / "lib/systemd/systemd").write_text("")
    (tmp_path / "var").mkdir(exist_ok=True)
    clean(tmp_path, EPOCH)
    for d in ("etc", "var"):
        assert f"TIMESTAMP_NSEC={EPOCH}000000000\n" in (tmp_path / d / ".updated").read_text()


def test_clean_clamps_shadow_last_change_to_the_epoch_day(tmp_path):
    make_tree(tmp_path)
    clean(tmp_path, EPOCH)
    assert (tmp_path / "etc/shadow").read_text().splitlines() == [
        "root:*:19675:0:99999:7:::", "nobody:*::0:99999:7:::", "old:*:100:0:99999:7:::"]


def test_scan_finds_openssh_private_key_not_the_public_one(tmp_path):
    (tmp_path / "root").mkdir()
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "root/id_ed25519")], check=True)
    assert find_private_keys(tmp_path) == ["root/id_ed25519"]
    with pytest.raises(UnsafeContentError, match="private key scan.*/root/id_ed25519"):
        refuse_private_keys(tmp_path)


def test_scan_finds_pgp_secret_keys_armored_and_binary(tmp_path, throwaway_key):
    home, fpr, _ = throwaway_key
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc/signing.asc").write_bytes(gpg(home, "--armor", "--export-secret-keys", fpr).stdout)
    (tree / "etc/signing.gpg").write_bytes(gpg(home, "--export-secret-keys", fpr).stdout)
    (tree / "etc/public.gpg").write_bytes(gpg(home, "--export", fpr).stdout)
    assert find_private_keys(tree) == ["etc/signing.asc", "etc/signing.gpg"]


def test_scan_ignores_markers_without_key_material_and_elf_test_vectors(tmp_path):
    (tmp_path / "doc.txt").write_text("Look for '-----BEGIN PRIVATE KEY-----' in your files.\n")
    (tmp_path / "lib.so").write_bytes(b"\x7fELF" + b"\0" * 16 + b"-----BEGIN PRIVATE KEY-----\n" + b"A" * 64 + b"\n")
    assert find_private_keys(tmp_path) == []
