"""`tmplbuild root` through the real CLI: root key holders each keep their key in their own GNUPGHOME, apart
from the online (CI) key; a root is drafted, signed by a threshold of holders, shown and published."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.test_repo import tmplbuild


def last_line(proc: subprocess.CompletedProcess[str]) -> str:
    lines = proc.stderr.strip().splitlines()
    return lines[-1] if lines else ""


@pytest.fixture(scope="module")
def holders(tmp_path_factory):
    """Root keys a, b, c, d and online keys ci, ci2, each in its own GNUPGHOME; name -> (home, fpr, .asc)."""
    base = tmp_path_factory.mktemp("holders")
    made = {}
    for name in ("a", "b", "c", "d", "ci", "ci2"):
        home = base / f"{name}-home"
        proc = tmplbuild("key", "generate", "--name", f"{name} <{name}@example.invalid>", "--gnupghome", str(home),
                         "--expire", "1y", "--out", str(base / f"{name}.asc"))
        assert proc.returncode == 0, proc.stderr
        made[name] = (home, proc.stdout.strip(), base / f"{name}.asc")
    yield made
    for home, _, _ in made.values():
        subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "all"], capture_output=True)


def sign(holders, path: Path, *names: str) -> None:
    for name in names:
        home, fpr, _ = holders[name]
        proc = tmplbuild("root", "sign", str(path), "--key", fpr, "--gnupghome", str(home))
        assert proc.returncode == 0, proc.stderr


@pytest.fixture
def repo(tmp_path, holders):
    """A repository initialised by the online key, as one from before roots."""
    home, fpr, _ = holders["ci"]
    repo = tmp_path / "repo"
    proc = tmplbuild("repo", "init", str(repo), "--key", fpr, "--gnupghome", str(home), "--id", "demo-repo")
    assert proc.returncode == 0, proc.stderr
    return repo


def init_root(holders, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    args = ["root", "init", str(out), "--repo-id", "demo-repo", "--threshold", "2"]
    for name in ("a", "b", "c"):
        args += ["--root-key", str(holders[name][2])]
    return tmplbuild(*args, "--online-key", str(holders["ci"][2]), *extra)


def test_a_2_of_3_root_is_drafted_signed_by_two_holders_and_published(holders, repo, tmp_path):
    draft = tmp_path / "1.root.json"
    proc = init_root(holders, draft)
    assert proc.returncode == 0, proc.stderr
    assert "root keys 2 of 3, online keys 1 of 1" in proc.stdout
    sign(holders, draft, "a")
    shown = tmplbuild("root", "show", str(draft))
    assert "signed by 1 of 2 needed its own root keys: NOT met" in shown.stdout
    # one holder is not enough: refused, and the repository has no root afterwards
    proc = tmplbuild("root", "publish", str(draft), "--repo", str(repo))
    assert proc.returncode == 3, proc.stderr
    assert "root signature" in last_line(proc) and "expected 2 of" in last_line(proc)
    assert not list(repo.glob("root/*.root.json"))
    sign(holders, draft, "c")
    assert "signed by 2 of 2 needed its own root keys: met" in tmplbuild("root", "show", str(draft)).stdout
    proc = tmplbuild("root", "publish", str(draft), "--repo", str(repo))
    assert proc.returncode == 0, proc.stderr
    assert (repo / "root/1.root.json").read_bytes() == draft.read_bytes()
    assert (repo / "root/1.root.json.asc").read_bytes() == Path(f"{draft}.asc").read_bytes()
    # no secret key material anywhere in the repository: the root keys never came near it
    assert b"PRIVATE KEY" not in b"".join(p.read_bytes() for p in repo.rglob("*") if p.is_file())

    # rotation: CI's key is replaced; root 2 needs 2 of root 1's keys and 2 of its own
    two = tmp_path / "2.root.json"
    proc = tmplbuild("root", "next", str(repo / "root/1.root.json"), str(two),
                     "--remove-online", holders["ci"][1], "--add-online", str(holders["ci2"][2]),
                     "--remove-root", holders["a"][1], "--add-root", str(holders["d"][2]))
    assert proc.returncode == 0, proc.stderr
    sign(holders, two, "d", "c")  # c is in both; d is new: 1 old key (c) is not a threshold of root 1
    assert tmplbuild("root", "publish", str(two), "--repo", str(repo)).returncode == 3
    assert not (repo / "root/2.root.json").exists()
    sign(holders, two, "b")  # b and c of root 1; c and d (and b) of root 2
    shown = tmplbuild("root", "show", str(two), "--repo", str(repo)).stdout
    assert "needed the root keys of root 1: met" in shown and "needed its own root keys: met" in shown
    proc = tmplbuild("root", "publish", str(two), "--repo", str(repo))
    assert proc.returncode == 0, proc.stderr
    assert f"removed keys/{holders['ci'][1]}.asc" in proc.stdout
    assert (repo / "keys" / f"{holders['ci2'][1]}.asc").exists()
    # the same root again is not a successor
    assert tmplbuild("root", "publish", str(two), "--repo", str(repo)).returncode in (3, 4)


def test_root_key_and_online_key_must_differ_and_drafts_are_not_overwritten(holders, tmp_path):
    out = tmp_path / "1.root.json"
    proc = tmplbuild("root", "init", str(out), "--repo-id", "demo-repo", "--root-key", str(holders["a"][2]),
                     "--online-key", str(holders["a"][2]))
    assert proc.returncode == 2 and "root keys stay offline" in last_line(proc)
    assert init_root(holders, out).returncode == 0
    sign(holders, out, "a")
    proc = init_root(holders, out)  # a new draft under a signature of the old one
    assert proc.returncode == 2 and f"{out}.asc exists" in last_line(proc)
    proc = tmplbuild("root", "sign", str(out), "--key", holders["ci"][1], "--gnupghome", str(holders["ci"][0]))
    assert proc.returncode == 2 and "online key" in last_line(proc)


def test_threshold_and_lifetime_are_checked_before_anything_is_written(holders, tmp_path):
    out = tmp_path / "1.root.json"
    proc = init_root(holders, out, "--threshold", "4")
    assert proc.returncode == 2 and "threshold 4, expected 1 to 3" in last_line(proc)
    proc = init_root(holders, out, "--online-threshold", "2")
    assert proc.returncode == 2 and "publishes with one online key" in last_line(proc)
    proc = init_root(holders, out, "--expires-in", "6y")
    assert proc.returncode == 2 and "root lifetime" in last_line(proc)
    assert not out.exists()


def test_a_first_root_must_name_the_key_that_signed_the_index_in_place(holders, repo, tmp_path):
    def publish_first(name: str, repo_id: str, online: str) -> subprocess.CompletedProcess[str]:
        """Root 1 with root key a and `online`, signed by a, published into the repository."""
        draft = tmp_path / name
        assert tmplbuild("root", "init", str(draft), "--repo-id", repo_id, "--root-key", str(holders["a"][2]),
                         "--online-key", str(holders[online][2])).returncode == 0
        sign(holders, draft, "a")
        return tmplbuild("root", "publish", str(draft), "--repo", str(repo))

    proc = publish_first("1.root.json", "demo-repo", "ci2")
    assert proc.returncode == 2 and "does not verify with the online keys of the new root" in last_line(proc)
    assert not list(repo.glob("root/*"))
    proc = publish_first("other.root.json", "another-repo", "ci")
    assert proc.returncode == 2 and "repo_id 'another-repo', the index in place 'demo-repo'" in last_line(proc)
    assert not list(repo.glob("root/*"))
