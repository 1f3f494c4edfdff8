"""Root keys are kept offline behind a passphrase; CI's online key signs unattended. And no gpg-agent that
tmplbuild starts outlives the command: key generate, key export, publish and root sign stop theirs (an agent the
user was already running in that home is theirs, and stays)."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.test_repo import make_artifact, tmplbuild
from tests.test_root_cli import init_root, last_line
from tmplbuild.sign.keys import agent_running, kill_agents


def _generate(tmp: Path, name: str, *extra: str) -> tuple[subprocess.CompletedProcess[str], Path]:
    home = tmp / f"{name}-home"
    proc = tmplbuild("key", "generate", "--name", f"{name} <{name}@example.invalid>", "--gnupghome", str(home),
                     "--expire", "1d", "--out", str(tmp / f"{name}.asc"), *extra)
    return proc, home


def _signs(home: Path, fpr: str, passphrase: str) -> bool:
    # To stdout: gpg's --output FILE replaces FILE by a rename, which would turn /dev/null into a regular file.
    return subprocess.run(["gpg", "--homedir", str(home), "--batch", "--pinentry-mode", "loopback", "--passphrase",
                           passphrase, "--local-user", fpr, "--detach-sign", "--output", "-"],
                          input=b"data", capture_output=True).returncode == 0


def test_a_root_key_needs_a_passphrase_and_gets_it(tmp_path):
    refused, home = _generate(tmp_path, "root0", "--role", "root")  # stdin is no terminal here
    assert refused.returncode == 2
    assert last_line(refused).startswith("tmplbuild: passphrase: a root key is protected by a passphrase: give "
                                         "--passphrase-file FILE")
    secret = tmp_path / "pass"
    secret.write_text("correct horse battery\n")
    made, home = _generate(tmp_path, "root1", "--role", "root", "--passphrase-file", str(secret))
    assert made.returncode == 0, made.stderr
    fpr = made.stdout.strip()
    assert not agent_running(home), "key generate left a gpg-agent running"
    assert not _signs(home, fpr, ""), "the root key signs without its passphrase"
    assert _signs(home, fpr, "correct horse battery")
    kill_agents(home)
    unprotected, home = _generate(tmp_path, "root2", "--role", "root", "--no-passphrase")
    assert unprotected.returncode == 0 and _signs(home, unprotected.stdout.strip(), "")
    kill_agents(home)


def test_the_online_key_signs_unattended_and_publish_leaves_no_agent(tmp_path):
    made, home = _generate(tmp_path, "ci")
    assert made.returncode == 0, made.stderr
    fpr = made.stdout.strip()
    assert not agent_running(home)
    assert _signs(home, fpr, "")
    kill_agents(home)
    repo = tmp_path / "repo"
    assert tmplbuild("repo", "init", str(repo), "--key", fpr, "--gnupghome", str(home), "--id", "t").returncode == 0
    assert not agent_running(home), "repo init left a gpg-agent running"
    published = tmplbuild("publish", "--skip-test", str(make_artifact(tmp_path / "out")), "--repo", str(repo),
                          "--key", fpr, "--gnupghome", str(home))
    assert published.returncode == 0, published.stderr
    assert not agent_running(home), "publish left a gpg-agent running"
    # An agent the user runs in that home before is theirs: kept.
    subprocess.run(["gpg-connect-agent", "--homedir", str(home), "/bye"], capture_output=True, check=True)
    assert agent_running(home)
    assert tmplbuild("key", "export", "--key", fpr, "--gnupghome", str(home), "--out-dir",
                     str(tmp_path / "export")).returncode == 0
    assert agent_running(home), "the user's own gpg-agent was stopped"
    kill_agents(home)


def test_root_sign_takes_the_passphrase_from_a_file_and_says_how_without_one(tmp_path):
    secret = tmp_path / "pass"
    secret.write_text("s3cret words\n")
    holders = {}
    for name in ("a", "b", "c"):
        proc, home = _generate(tmp_path, name, "--role", "root", "--passphrase-file", str(secret))
        assert proc.returncode == 0, proc.stderr
        holders[name] = (home, proc.stdout.strip(), tmp_path / f"{name}.asc")
    proc, home = _generate(tmp_path, "ci")
    holders["ci"] = (home, proc.stdout.strip(), tmp_path / "ci.asc")
    draft = tmp_path / "1.root.json"
    assert init_root(holders, draft).returncode == 0
    home, fpr, _ = holders["a"]
    plain = tmplbuild("root", "sign", str(draft), "--key", fpr, "--gnupghome", str(home))
    assert plain.returncode == 2
    assert last_line(plain) == (f"tmplbuild: passphrase: key {fpr} has a passphrase: give --passphrase-file FILE, "
                                "or run on a terminal")
    assert not Path(f"{draft}.asc").exists()
    wrong = tmp_path / "wrong"
    wrong.write_text("not it\n")
    bad = tmplbuild("root", "sign", str(draft), "--key", fpr, "--gnupghome", str(home), "--passphrase-file", str(wrong))
    assert bad.returncode == 2 and not Path(f"{draft}.asc").exists()
    good = tmplbuild("root", "sign", str(draft), "--key", fpr, "--gnupghome", str(home), "--passphrase-file", str(secret))
    assert good.returncode == 0, good.stderr
    assert "1 signature(s) now" in good.stdout
    for home, _, _ in holders.values():
        assert not agent_running(home), f"a gpg-agent was left running in {home}"
        kill_agents(home)


@pytest.fixture(autouse=True)
def _no_agents_left(tmp_path):
    yield
    for home in tmp_path.glob("*-home"):
        kill_agents(home)
