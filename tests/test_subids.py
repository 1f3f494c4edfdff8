"""contrib/subids.sh, which `make test`, `make demo` and .ci/run call: root gets the subordinate id range
unprivileged containers need (root:100000:65536, as Proxmox VE sets it) when it has none, and nothing that is
already there is ever changed."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.conftest import ROOT

SCRIPT = ROOT / "contrib/subids.sh"


def run(*files: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sh", str(SCRIPT)], env={**os.environ, "SUBID_FILES": " ".join(map(str, files))},
                          capture_output=True, text=True, check=True)


def test_adds_roots_range_once_to_a_fresh_machines_files(tmp_path):
    uid, gid = tmp_path / "subuid", tmp_path / "subgid"
    uid.write_text("")  # Debian's fresh /etc/subuid: empty; /etc/subgid: absent here
    first = run(uid, gid)
    assert uid.read_text() == gid.read_text() == "root:100000:65536\n"
    assert first.stdout.count("added root:100000:65536") == 2
    again = run(uid, gid)
    assert uid.read_text() == gid.read_text() == "root:100000:65536\n" and again.stdout == again.stderr == ""


def test_never_touches_an_existing_range_or_overlaps_another_users(tmp_path):
    own, other, fine = tmp_path / "own", tmp_path / "other", tmp_path / "fine"
    own.write_text("alice:300000:65536\nroot:200000:65536\n")
    other.write_text("alice:100000:65536\n")
    fine.write_text("alice:300000:65536\n")
    done = run(own, other, fine)
    assert own.read_text() == "alice:300000:65536\nroot:200000:65536\n"
    assert other.read_text() == "alice:100000:65536\n"
    assert fine.read_text() == "alice:300000:65536\nroot:100000:65536\n"
    assert "root already has root:200000:65536" in done.stderr and "alice's range overlaps" in done.stderr


def test_make_test_and_make_demo_run_it():
    makefile = (ROOT / "Makefile").read_text()
    for target in ("test", "demo"):
        line = next(ln for ln in makefile.splitlines() if ln.startswith(f"{target}:"))
        assert "subids" in line.split(":", 1)[1].split(), line
    assert "make test" in (ROOT / ".ci/run").read_text()
