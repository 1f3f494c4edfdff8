"""`tmplbuild test` without root or containers: argument handling, the relay's refusals, usage errors."""
from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT
from tmplbuild.boot.relay import plan_routes
from tmplbuild.boot.runner import resolve_managers
from tmplbuild.errors import UsageError


def tmplbuild(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tmplbuild", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_manager_names_are_validated_and_all_expands_in_order():
    assert resolve_managers([]) == (["nspawn", "lxc", "lxc-unprivileged", "proxmox", "proxmox-privileged"], False)
    assert resolve_managers(["lxc,nspawn"]) == (["lxc", "nspawn"], True)
    assert resolve_managers(["all"])[1] is False
    with pytest.raises(UsageError, match="expected one of"):
        resolve_managers(["docker"])


def test_the_relay_refuses_sources_no_container_could_reach():
    plan = plan_routes([("http://127.0.0.1:3142/debian", ["bookworm"]), ("https://mirror.example.org/debian", ["x"]),
                        ("file:/srv/mirror", ["x"]), ("http://10.1.2.3/debian", ["x"]), ("http://apt-cache/debian", ["x"]),
                        ("http://mirror.example.org/debian", ["bookworm"]),
                        ("http://mirror.example.org/debian", ["bookworm-updates"])], resolve=False)
    assert [r.host for r in plan.routes] == ["mirror.example.org"]
    assert plan.routes[0].prefix == "/debian/"
    assert len(plan.refused) == 5
    assert any("127.0.0.1" in r and "port 3142" in r for r in plan.refused)
    assert any("10.1.2.3 is a local address" in r for r in plan.refused)
    assert any("https" in r for r in plan.refused) and any("file" in r for r in plan.refused)
    assert any("apt-cache is a local name" in r for r in plan.refused)


def test_usage_errors_exit_2(tmp_path):
    bogus = tmp_path / "x.tar.zst"
    res = tmplbuild("test", str(bogus), timeout=60)
    assert res.returncode == 2 and "no such file" in res.stderr
    bogus.write_bytes(b"")
    res = tmplbuild("test", str(bogus), "--manager", "docker", timeout=60)
    assert res.returncode == 2 and "--manager" in res.stderr
    wrong = tmp_path / "x.zip"
    wrong.write_bytes(b"")
    res = tmplbuild("test", str(wrong), timeout=60)
    assert res.returncode == 2 and ".tar.zst" in res.stderr
    res = tmplbuild("test", str(bogus), "--jobs", "0", timeout=60)
    assert res.returncode == 2 and "--jobs" in res.stderr and "1 or more" in res.stderr

