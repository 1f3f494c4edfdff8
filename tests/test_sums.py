"""SHA256SUMS: one writer and one strict reader. What publish writes is what `sha256sum -c` reads, and what every
checker (repo verify, the server's upload check, the convergence clean-up) refuses is refused by all of them."""
from __future__ import annotations

import subprocess

import pytest

from tmplbuild.repo import accept, sums
from tmplbuild.repo import index as idx

A, B = "a" * 64, "b" * 64


def test_render_is_what_sha256sum_checks(tmp_path):
    (tmp_path / "x.tar.zst").write_bytes(b"template")
    (tmp_path / "x.manifest.json").write_bytes(b"{}")
    import hashlib

    want = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in tmp_path.iterdir()}
    (tmp_path / sums.NAME).write_bytes(sums.render(want))
    proc = subprocess.run(["sha256sum", "--strict", "-c", sums.NAME], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sums.parse((tmp_path / sums.NAME).read_bytes()) == want and sums.matches(tmp_path / sums.NAME, want)


@pytest.mark.parametrize("text, reason", [
    (f"{A}  x\n{A}  x\n".encode(), "repeated"),
    (f"{A} x\n".encode(), "malformed"),
    (f"{A}  ../x\n".encode(), "malformed"),
    (b"\xff\xfe", "UTF-8"),
])
def test_refused_by_the_one_reader(text, reason):
    with pytest.raises(sums.SumsError, match=reason):
        sums.parse(text)
    assert sums.difference(text, {"x": A}) is not None


def test_difference_names_the_first_disagreement():
    assert sums.difference(sums.render({"x": A}), {"x": A}) is None
    assert "y" in sums.difference(sums.render({"x": A, "y": B}), {"x": A})


def test_one_file_check_for_every_reader():
    ref = idx.FileRef("templates/t/1/t_1_amd64.tar.zst", 5, A, B * 2, "tar.zst")
    assert accept.file_problem(ref, 5, A, B * 2) is None
    assert accept.file_problem(ref, 6, A, B * 2).check == "size"
    assert accept.file_problem(ref, 5, B, B * 2).check == "sha256"
    assert accept.file_problem(ref, 5, A, A * 2).check == "sha512"
    manifest_ref = idx.FileRef("templates/t/1/t_1_amd64.manifest.json", 5, A)  # size and sha256 only
    assert accept.file_problem(manifest_ref, 5, A, "") is None
