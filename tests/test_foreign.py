"""Another architecture's binaries on this host (tmplbuild.foreign): what binfmt_misc must hold, the one-line
refusal naming what is missing, and the qemu a template's boot needs. The entries are a directory of our own
($TMPLBUILD_BINFMT_DIR), so every case runs on any host."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tmplbuild import foreign

ENTRY = "enabled\ninterpreter {interp}\nflags: {flags}\noffset 0\nmagic 7f454c46\nmask ffffffff\n"


@pytest.fixture
def binfmt(tmp_path, monkeypatch):
    d = tmp_path / "binfmt"
    d.mkdir()
    (d / "status").write_text("enabled\n")
    monkeypatch.setenv("TMPLBUILD_BINFMT_DIR", str(d))
    return d


def qemu(tmp_path: Path, cpu: str, version: str) -> Path:
    """A stand-in interpreter that says its version as qemu-user does."""
    path = tmp_path / f"qemu-{cpu}-static"
    path.write_text(f"#!/bin/sh\necho 'qemu-{cpu} version {version} (Debian)'\n")
    path.chmod(0o755)
    return path


def test_the_host_and_what_its_kernel_runs_natively_need_no_emulator(binfmt):
    assert foreign.emulator("amd64", host="amd64") is None
    assert foreign.emulator("i386", host="amd64") is None
    assert foreign.emulator("armhf", host="arm64") is None
    assert foreign.is_foreign("arm64", host="amd64")


def test_each_missing_piece_is_named_with_how_to_install_it(binfmt, tmp_path):
    with pytest.raises(foreign.CannotRun, match="no binfmt_misc entry qemu-aarch64.*apt-get install qemu-user-static"):
        foreign.emulator("arm64", host="amd64")
    interp = qemu(tmp_path, "aarch64", "7.2.22")
    (binfmt / "qemu-aarch64").write_text(ENTRY.format(interp=interp, flags="P"))
    with pytest.raises(foreign.CannotRun, match="lacks the fix-binary flag F"):
        foreign.emulator("arm64", host="amd64")
    (binfmt / "qemu-aarch64").write_text(ENTRY.format(interp=interp, flags="PF").replace("enabled", "disabled"))
    with pytest.raises(foreign.CannotRun, match="disabled"):
        foreign.emulator("arm64", host="amd64")
    (binfmt / "qemu-aarch64").write_text(ENTRY.format(interp=interp, flags="PF"))
    emu = foreign.emulator("arm64", host="amd64")
    assert emu is not None and emu.interpreter == interp and emu.version() == (7, 2)
    (binfmt / "status").unlink()
    with pytest.raises(foreign.CannotRun, match="binfmt_misc is not mounted"):
        foreign.emulator("arm64", host="amd64")


def test_riscv64_boots_only_under_a_qemu_that_runs_its_systemd(binfmt, tmp_path):
    (binfmt / "qemu-riscv64").write_text(ENTRY.format(interp=qemu(tmp_path, "riscv64", "7.2.22"), flags="PF"))
    why = foreign.boot_problem("riscv64", host="amd64")
    assert why is not None and "qemu-user 7.2" in why and "10.0 or later" in why
    (binfmt / "qemu-riscv64").write_text(ENTRY.format(interp=qemu(tmp_path, "riscv64", "10.0.2"), flags="OPF"))
    assert foreign.boot_problem("riscv64", host="amd64") is None
    assert "no binfmt_misc entry qemu-aarch64" in foreign.boot_problem("arm64", host="amd64")


def test_an_elf_header_names_its_architecture(tmp_path):
    assert foreign.elf_arch(Path(sys.executable).resolve()) == foreign.host_arch()
    arm = tmp_path / "arm"
    arm.write_bytes(b"\x7fELF\x02\x01\x01" + bytes(11) + (183).to_bytes(2, "little") + bytes(40))
    assert foreign.elf_arch(arm) == "arm64"
    (tmp_path / "text").write_text("#!/bin/sh\n")
    assert foreign.elf_arch(tmp_path / "text") is None


def test_a_build_the_host_cannot_run_exits_2_and_writes_nothing(binfmt, tmp_path):
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    shutil.copy(ROOT / "recipes/debian-12-minimal.toml", recipes)  # it lists arm64
    shutil.copytree(ROOT / "recipes/files", recipes / "files")
    out = tmp_path / "out"
    res = subprocess.run([sys.executable, "-m", "tmplbuild", "build", str(recipes / "debian-12-minimal.toml"),
                          "--arch", "arm64", "--out", str(out), "--cache-dir", str(tmp_path / "cache")],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert res.returncode == 2, res.stderr
    line = res.stderr.strip().splitlines()[-1]
    assert "this host cannot run arm64 binaries" in line and "qemu-aarch64" in line and "qemu-user-static" in line
    assert not out.exists() and not (tmp_path / "cache").exists()


def test_what_qemu_user_cannot_run_is_put_down_to_it_and_nothing_else():
    from tmplbuild.boot import emulation

    blamed: dict[str, str] = {}
    why = emulation.blame("systemd-networkd.service", "Could not setup manager: Protocol not supported", blamed)
    assert why is not None and "NETLINK_GENERIC" in why
    blamed["systemd-networkd.service"] = why
    assert emulation.blame("systemd-networkd.socket", "Failed with result 'service-start-limit-hit'.", blamed)
    assert "sandbox" in emulation.blame("e2scrub_reap.service", "Failed at step NETWORK spawning /sbin/e2scrub_all: "
                                                                "Input/output error", blamed)
    # The template's own faults stay the template's.
    assert emulation.blame("nginx.service", "nginx: [emerg] unknown directive", blamed) is None
    assert emulation.blame("systemd-networkd.service", "Failed to parse 80-dhcp.network", {}) is None
    assert emulation.blame("ssh.socket", "Failed with result 'service-start-limit-hit'.", blamed) is None


def test_the_dhcp_servers_offer_is_read_from_its_log(tmp_path):
    from tmplbuild.boot.netns import TestNetwork

    (tmp_path / "dnsmasq.log").write_text(
        "Dec  6 11:35:40 dnsmasq-dhcp[8779]: 3411015496 DHCPDISCOVER(tbpro1) c6:e8:e1:7a:5b:60 \n"
        "Dec  6 11:35:40 dnsmasq-dhcp[8779]: 3411015496 DHCPOFFER(tbpro1) 10.213.1.152 c6:e8:e1:7a:5b:60 \n")
    net = TestNetwork(name="unused", workdir=tmp_path)
    assert net.offer_for("C6:E8:E1:7A:5B:60") == "10.213.1.152"
    assert net.offer_for("c6:e8:e1:7a:5b:61") is None


def test_the_credential_drop_ins_go_into_the_containers_copy_owned_by_its_root(tmp_path):
    from tmplbuild.boot import emulation

    (tmp_path / "etc/systemd/system").mkdir(parents=True)
    written = emulation.write_dropins(tmp_path, uid_offset=0)
    assert "/etc/systemd/system/systemd-sysusers.service.d/zz-tmplbuild-test-qemu-user.conf" in written
    text = (tmp_path / written[0].lstrip("/")).read_text()
    assert "LoadCredential=\n" in text and "[Service]" in text
