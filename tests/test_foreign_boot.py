"""A real arm64 template built on this amd64 host through qemu-user-static (binfmt_misc), twice to the same bytes,
and booted under systemd-nspawn and LXC through the same emulator: every check runs, and what qemu-user cannot
run is reported by name, never silently skipped. Skipped, saying why, where the host cannot run it.
`make test` runs arm64; `make test-all` adds armhf ($TMPLBUILD_TEST_ARCHES, comma-separated)."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from tests.conftest import ROOT, can_build
from tmplbuild import foreign
from tmplbuild.boot.emulation import DROPIN

ARCHES = [a for a in os.environ.get("TMPLBUILD_TEST_ARCHES", "arm64").split(",") if a]
ELF = {"arm64": 183, "armhf": 40}
PLATFORM = {"arm64": {"os": "linux", "architecture": "arm64", "variant": "v8"},
            "armhf": {"os": "linux", "architecture": "arm", "variant": "v7"}}
pytestmark = [pytest.mark.build, pytest.mark.boot,
              pytest.mark.skipif(can_build() is not None, reason=str(can_build()))]


def tmplbuild(*args: str, timeout: float = 1800, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tmplbuild", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module", params=ARCHES)
def builds(request, tmp_path_factory) -> tuple[str, list[Path]]:
    """Two builds of the shipped debian-12-minimal for the architecture, one package cache: the first hands the
    emulated dpkg the packages with their members decompressed natively (the default), the second the archive's
    files as they are (TMPLBUILD_PLAIN_DEBS=0)."""
    arch = request.param
    if (why := foreign.boot_problem(arch)) is not None:
        pytest.skip(why)
    cache = tmp_path_factory.mktemp("cache")
    manifests = []
    for i in range(2):
        out = tmp_path_factory.mktemp(f"out{i}")
        res = tmplbuild("build", "debian-12-minimal", "--arch", arch, "--out", str(out), "--cache-dir", str(cache),
                        env={"TMPLBUILD_PLAIN_DEBS": "1" if i == 0 else "0"})
        assert res.returncode == 0, res.stderr[-3000:]
        manifests.append(next(out.glob(f"debian-12-minimal_*_{arch}.manifest.json")))
    return arch, manifests


def test_a_foreign_build_is_of_its_architecture_reproducible_and_carries_nothing_of_the_emulator(builds):
    # Equal artifacts from the two builds: reproducible, and the natively decompressed packages install the
    # same tree as the archive's own files.
    arch, manifests = builds
    first, second = (json.loads(m.read_text()) for m in manifests)
    assert first["arch"] == arch
    assert {a["file"]: a["sha256"] for a in first["artifacts"]} == {a["file"]: a["sha256"] for a in second["artifacts"]}
    tar = manifests[0].with_name(first["artifacts"][0]["file"])
    with _zst(tar) as t:
        names = t.getnames()
        dpkg = t.extractfile("./usr/bin/dpkg").read(20)
    assert int.from_bytes(dpkg[18:20], "little") == ELF[arch], f"usr/bin/dpkg is not an {arch} ELF"
    assert not [n for n in names if "qemu" in n.rsplit("/", 1)[-1]], "an emulator binary reached the template"
    assert first["oci"]["platform"] == PLATFORM[arch]
    assert all(p["arch"] in (arch, "all") for p in first["packages"])


def _zst(path: Path) -> tarfile.TarFile:
    import zstandard

    data = zstandard.ZstdDecompressor().stream_reader(open(path, "rb")).read()
    return tarfile.open(fileobj=io.BytesIO(data), mode="r:")


def test_a_foreign_template_boots_under_nspawn_and_lxc_and_names_what_qemu_cannot_do(builds):
    _, manifests = builds
    doc = json.loads(manifests[0].read_text())
    tar = manifests[0].with_name(doc["artifacts"][0]["file"])
    res = tmplbuild("test", str(tar), "--manager", "nspawn,lxc", "--apt-mirror", "named", "--json", timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    report = json.loads(res.stdout)
    assert report["status"] == "pass"
    for m in report["managers"]:
        checks = {c["name"]: c for c in m["checks"]}
        for name in ("boot", "hostname", "hosts", "machine-id", "shutdown"):
            assert checks[name]["status"] == "pass", (m["manager"], checks[name])
        # systemd-networkd cannot start under qemu-user: the network and what needs it are skipped by name.
        for name in ("network", "dns", "apt"):
            assert checks[name]["status"] == "skip" and "qemu-user" in checks[name]["evidence"], (m["manager"], checks[name])
        assert "NETLINK_GENERIC" in checks["network"]["evidence"]
        assert "only by what qemu-user cannot run" in checks["boot"]["evidence"]
    # The harness's drop-ins went into the containers' copies, never into the template.
    with _zst(tar) as t:
        assert not [n for n in t.getnames() if n.endswith(DROPIN)]


def _cannot_run(arch: str) -> str | None:
    try:
        foreign.emulator(arch)
    except foreign.CannotRun as exc:
        return exc.message
    return None


@pytest.mark.skipif(_cannot_run("riscv64") is not None, reason=str(_cannot_run("riscv64")))
def test_riscv64_debian_13_builds_and_boots_or_says_by_name_why_it_cannot_here(tmp_path):
    """Debian 13 is the first release with riscv64: debian-13-minimal builds for it through qemu-user 7.2. Its
    systemd 257 boots only under qemu 10 or later; with an older qemu, `tmplbuild test` says so by name (exit 2)
    instead of reporting a boot failure the template does not have."""
    out = tmp_path / "out"
    res = tmplbuild("build", "debian-13-minimal", "--arch", "riscv64", "--out", str(out),
                    "--cache-dir", str(tmp_path / "cache"))
    assert res.returncode == 0, res.stderr[-3000:]
    doc = json.loads(next(out.glob("debian-13-minimal_*_riscv64.manifest.json")).read_text())
    assert doc["arch"] == "riscv64" and doc["suite"] == "trixie"
    tar = out / doc["artifacts"][0]["file"]
    with _zst(tar) as t:
        assert int.from_bytes(t.extractfile("./usr/bin/dpkg").read(20)[18:20], "little") == 243  # EM_RISCV
    assert doc["oci"]["platform"] == {"os": "linux", "architecture": "riscv64"}
    assert all(p["arch"] in ("riscv64", "all") for p in doc["packages"])
    booted = tmplbuild("test", str(tar), "--manager", "nspawn,lxc", "--apt-mirror", "named", "--json", timeout=1800)
    why = foreign.boot_problem("riscv64")
    if why is None:
        assert booted.returncode == 0, booted.stdout[-3000:] + booted.stderr[-2000:]
        assert json.loads(booted.stdout)["status"] == "pass"
    else:
        assert booted.returncode == 2
        assert "riscv64 templates do not boot under qemu-user" in booted.stderr and "qemu 10.0 or later" in booted.stderr
