"""The packages a foreign-architecture build hands its emulated dpkg: the archive's .debs with control.tar and
data.tar decompressed natively. dpkg must read from them exactly what it reads from the originals, whatever the
original compressor, and a damaged package must fail the build by name with nothing left behind."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tmplbuild.builder import plaindeb
from tmplbuild.errors import BuildError

pytestmark = pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="dpkg-deb is not installed")


def _deb(tmp: Path, compressor: str) -> Path:
    """A package with what a tar member can carry: odd sizes, a symlink, a set-uid file, an empty directory."""
    src = tmp / f"src-{compressor}"
    (src / "DEBIAN").mkdir(parents=True)
    (src / "DEBIAN/control").write_text("Package: sample\nVersion: 1.0\nArchitecture: all\n"
                                        "Maintainer: Test <test@example.invalid>\nDescription: sample\n")
    (src / "DEBIAN/postinst").write_text("#!/bin/sh\nexit 0\n")
    os.chmod(src / "DEBIAN/postinst", 0o755)
    (src / "usr/bin").mkdir(parents=True)
    (src / "usr/bin/tool").write_bytes(os.urandom(70001))  # incompressible, odd
    (src / "usr/bin/tool").chmod(0o4755)
    (src / "usr/share/doc/sample").mkdir(parents=True)
    (src / "usr/share/doc/sample/README").write_text("x" * 100000 + "\n")
    (src / "usr/bin/alias").symlink_to("tool")
    (src / "var/empty").mkdir(parents=True)
    out = tmp / f"sample-{compressor}.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", f"-Z{compressor}", "--build", str(src), str(out)],
                   check=True, capture_output=True)
    return out


def _read(deb: Path, what: str) -> bytes:
    return subprocess.run(["dpkg-deb", what, str(deb)], check=True, capture_output=True).stdout


def _ar_names(deb: Path) -> list[str]:
    return subprocess.run(["ar", "t", str(deb)], check=True, capture_output=True, text=True).stdout.split()


@pytest.mark.parametrize("compressor", ["xz", "gzip", "zstd"])
def test_dpkg_reads_the_same_control_and_data_from_the_decompressed_package(tmp_path, compressor):
    original = _deb(tmp_path, compressor)
    assert _ar_names(original)[1] != "control.tar"  # the fixture really is compressed
    plain = tmp_path / "plain.deb"
    plaindeb.decompress(original, plain)
    assert _ar_names(plain) == ["debian-binary", "control.tar", "data.tar"]
    assert _read(plain, "--fsys-tarfile") == _read(original, "--fsys-tarfile")
    assert _read(plain, "--ctrl-tarfile") == _read(original, "--ctrl-tarfile")
    assert _read(plain, "--field") == _read(original, "--field")
    # And what dpkg-deb installs from it: same files, modes, link targets.
    for deb, dest in ((original, tmp_path / "x-original"), (plain, tmp_path / "x-plain")):
        subprocess.run(["dpkg-deb", "-x", str(deb), str(dest)], check=True)
    listing = [subprocess.run(["find", ".", "-printf", "%p %m %s %l\\n"], cwd=d, check=True, capture_output=True,
                              text=True).stdout.splitlines() for d in (tmp_path / "x-original", tmp_path / "x-plain")]
    assert sorted(listing[0]) == sorted(listing[1])
    assert (tmp_path / "x-plain/usr/bin/tool").read_bytes() == (tmp_path / "x-original/usr/bin/tool").read_bytes()


def test_an_uncompressed_package_passes_through_unchanged(tmp_path):
    original = _deb(tmp_path, "none")
    plain = tmp_path / "plain.deb"
    plaindeb.decompress(original, plain)
    assert plain.read_bytes() == original.read_bytes()


@pytest.mark.parametrize("damage", ["truncated", "corrupt", "not-ar"])
def test_a_damaged_package_fails_the_build_by_name_and_leaves_nothing(tmp_path, damage):
    good = _deb(tmp_path, "xz")
    bad = tmp_path / "bad_1.0_all.deb"
    data = good.read_bytes()
    if damage == "truncated":
        data = data[: len(data) - 5000]
    elif damage == "corrupt":
        # Flip bytes inside data.tar.xz's stream, past its header.
        mid = len(data) - 20000
        data = data[:mid] + bytes(b ^ 0xFF for b in data[mid:mid + 64]) + data[mid + 64:]
    else:
        data = b"PK\x03\x04 not a deb" + data
    bad.write_bytes(data)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(BuildError) as err:
        plaindeb.decompress_all([(good, out / good.name), (bad, out / bad.name)])
    assert err.value.check == "bootstrap"
    assert "bad_1.0_all.deb" in str(err.value)
    assert not (out / bad.name).exists()
