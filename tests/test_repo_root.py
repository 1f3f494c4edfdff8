"""A repository directory with a root of trust (tmplbuild.repo.chain), from the maintainer's side, through the
real command line and real gpg throwaway keys: migrating a repository from before roots, a publisher whose key
the newest root does not name, a rotation that drops an online key (the recovery procedure after a stolen CI
key: `repo resign --carry-over`, `repo remove`), an expired root, and `repo verify` auditing the chain."""
from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.test_repo import index_of, make_artifact, tmplbuild
from tests.test_repo import publish as publish_as
from tests.conftest import Keys
from tests.test_server import snapshot
from tmplbuild.repo import chain as repochain

V1, V2, V3 = "12-20261120", "12-20261130", "12-20261201"
ROOT_KEYS = ("root-a", "root-b")


def who(keys: Keys, name: str) -> tuple[Path, str]:
    """(GNUPGHOME, fingerprint) of one throwaway key, as tests/test_repo.py's helpers take a maintainer's key."""
    return keys.home, keys[name]


def install(repo: Path, keys: Keys, version: int, online: tuple[str, ...], signers: tuple[str, ...] = ROOT_KEYS,
            **kw) -> None:
    data = keys.root(version, ROOT_KEYS, online, threshold=2, **kw)
    repochain.install(repo, data, keys.sign(data, *signers))


def legacy_repo(tmp: Path, keys: Keys, signer: str = "online-1") -> Path:
    """A repository as `repo init` + `publish` make it today (no root/), with one template."""
    repo = tmp / "repo"
    proc = tmplbuild("repo", "init", str(repo), "--key", keys[signer], "--gnupghome", str(keys.home),
                     "--id", "test-repo")
    assert proc.returncode == 0, proc.stderr
    proc = publish_as(repo, who(keys, signer), make_artifact(tmp / "v1"))
    assert proc.returncode == 0, proc.stderr
    return repo


def errors(proc: subprocess.CompletedProcess[str]) -> list[str]:
    """The lines of stderr but publish's --skip-test notice: one line per failure, as DESIGN.md says."""
    return [ln for ln in proc.stderr.splitlines() if ln.strip() and "--skip-test" not in ln]


def verify(repo: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return tmplbuild("repo", "verify", str(repo), *args)


def gpgv_sums(tmp: Path, repo: Path, directory: str, fpr: str) -> subprocess.CompletedProcess[bytes]:
    """gpgv + the repository's keys/<FPR>.asc (dearmored), as a person checking by hand does."""
    keyring = tmp / f"{fpr}-{time.monotonic_ns()}.gpg"
    with open(repo / f"keys/{fpr}.asc", "rb") as armored, open(keyring, "wb") as out:
        subprocess.run(["gpg", "--dearmor"], stdin=armored, stdout=out, check=True)
    d = repo / directory
    return subprocess.run(["gpgv", "--keyring", str(keyring), "SHA256SUMS.gpg", "SHA256SUMS"], cwd=d,
                          capture_output=True)


def signer_of(repo: Path, keys: Keys) -> str:
    """The name of the throwaway key whose signature index.json.asc carries."""
    out = subprocess.run(["gpg", "--homedir", str(keys.home), "--batch", "--status-fd", "1", "--verify",
                          str(repo / "index.json.asc"), str(repo / "index.json")], capture_output=True, text=True)
    for line in out.stdout.splitlines():
        if line.startswith("[GNUPG:] VALIDSIG"):
            fpr = line.split()[-1]
            return next(n for n, f in keys.fprs.items() if f == fpr)
    raise AssertionError(out.stderr)


# ---------------------------------------------------------------------------------------------- migration


def test_an_existing_repository_migrates_to_a_root_and_keeps_publishing(tmp_path, keys):
    repo = legacy_repo(tmp_path, keys)
    install(repo, keys, 1, ("online-1",))
    assert sorted(p.name for p in (repo / "root").iterdir()) == ["1.root.json", "1.root.json.asc"]
    assert (repo / f"keys/{keys['online-1']}.asc").is_file()
    proc = verify(repo)
    assert proc.returncode == 0, proc.stderr
    # The root keys pinned out of band anchor the repository's chain; a key that is no root key anchors nothing.
    proc = verify(repo, "--root-key", keys["root-a"], "--root-key", keys["root-b"])
    assert proc.returncode == 0, proc.stderr
    proc = verify(repo, "--root-key", keys["thief"])
    assert proc.returncode == 3 and "root pin" in proc.stderr

    proc = publish_as(repo, who(keys, "online-1"), make_artifact(tmp_path / "v2", version=V2, payload="two\n"))
    assert proc.returncode == 0, proc.stderr
    assert index_of(repo)["version"] == 3
    assert verify(repo).returncode == 0
    # What a person checks by hand still verifies with the keys/ file, as before the root.
    for version in (V1, V2):
        got = gpgv_sums(tmp_path, repo, f"templates/demo/{version}", keys["online-1"])
        assert got.returncode == 0, got.stderr
    subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=repo / f"templates/demo/{V2}", check=True,
                   capture_output=True)
    # --repair leaves the root documents alone: they are no leftover.
    proc = verify(repo, "--repair")
    assert proc.returncode == 0, proc.stderr
    assert (repo / "root/1.root.json").is_file() and (repo / "root/1.root.json.asc").is_file()


def test_a_root_whose_online_keys_did_not_sign_the_index_is_not_installed(tmp_path, keys):
    repo = legacy_repo(tmp_path, keys)
    before = snapshot(repo)
    data = keys.root(1, ROOT_KEYS, ("online-2",), threshold=2)
    from tmplbuild.errors import UsageError

    with pytest.raises(UsageError, match="name the key that signs the index"):
        repochain.install(repo, data, keys.sign(data, *ROOT_KEYS))
    assert snapshot(repo) == before


def test_publishing_with_a_key_the_root_does_not_name_is_refused_before_anything_is_written(tmp_path, keys):
    repo = legacy_repo(tmp_path, keys)
    install(repo, keys, 1, ("online-1",))
    before = snapshot(repo)
    art = make_artifact(tmp_path / "v2", version=V2)
    for name in ("online-2", "root-a"):  # neither an online key nor (root-a) one meant to sign indexes
        proc = publish_as(repo, who(keys, name), art)
        assert proc.returncode == 3, proc.stderr
        assert f"signer: key {keys[name]} is not an online key of root 1" in proc.stderr
        assert len(errors(proc)) == 1
        assert snapshot(repo) == before
    for argv in (("repo", "resign", str(repo)), ("repo", "prune", str(repo), "--keep", "1"),
                 ("repo", "remove", str(repo), "demo", V1)):
        proc = tmplbuild(*argv, "--key", keys["online-2"], "--gnupghome", str(keys.home))
        assert proc.returncode == 3 and "signer" in proc.stderr, (argv, proc.stderr)
        assert snapshot(repo) == before


def test_an_expired_root_stops_every_publisher_with_exit_4(tmp_path, keys):
    repo = legacy_repo(tmp_path, keys)
    # Written as a root holder would have installed it ten days ago: it expired nine days ago.
    data = keys.root(1, ROOT_KEYS, ("online-1",), threshold=2, now=time.time() - 10 * 86400)
    (repo / "root").mkdir()
    (repo / "root/1.root.json.asc").write_bytes(keys.sign(data, *ROOT_KEYS))
    (repo / "root/1.root.json").write_bytes(data)
    before = snapshot(repo)
    proc = publish_as(repo, who(keys, "online-1"), make_artifact(tmp_path / "v2", version=V2))
    assert proc.returncode == 4 and "root expired: root 1 of test-repo expired at" in proc.stderr, proc.stderr
    proc = tmplbuild("repo", "resign", str(repo), "--key", keys["online-1"], "--gnupghome", str(keys.home))
    assert proc.returncode == 4 and "root expired" in proc.stderr
    assert snapshot(repo) == before
    proc = verify(repo)
    assert proc.returncode == 4 and "root/1.root.json" in proc.stderr and "expired" in proc.stderr
    # A new root, signed by the same root keys, ends it (intermediate roots may have expired).
    install(repo, keys, 2, ("online-1",))
    assert publish_as(repo, who(keys, "online-1"), make_artifact(tmp_path / "v3", version=V3)).returncode == 0
    assert verify(repo).returncode == 0


# ---------------------------------------------------------------------------------------------- rotation


def test_after_a_rotation_the_dropped_key_is_refused_and_the_index_is_carried_over_by_review(tmp_path, keys):
    repo = legacy_repo(tmp_path, keys)
    install(repo, keys, 1, ("online-1",))
    install(repo, keys, 2, ("online-2",))  # online-1 is stolen: root 2 names online-2 instead
    assert not (repo / f"keys/{keys['online-1']}.asc").exists()
    assert (repo / f"keys/{keys['online-2']}.asc").is_file()
    before = snapshot(repo)

    art = make_artifact(tmp_path / "v2", version=V2, payload="two\n")
    proc = publish_as(repo, who(keys, "online-1"), art)
    assert proc.returncode == 3 and "is not an online key of root 2" in proc.stderr
    # The new key is refused too while the index in place is the old key's: review first.
    proc = publish_as(repo, who(keys, "online-2"), art)
    assert proc.returncode == 3, proc.stderr
    assert "index signer" in proc.stderr and f"tmplbuild repo resign {repo} --carry-over" in proc.stderr
    assert len(errors(proc)) == 1
    proc = tmplbuild("repo", "prune", str(repo), "--keep", "1", "--key", keys["online-2"], "--gnupghome",
                     str(keys.home))
    assert proc.returncode == 3 and "--carry-over" in proc.stderr
    proc = tmplbuild("repo", "resign", str(repo), "--key", keys["online-2"], "--gnupghome", str(keys.home))
    assert proc.returncode == 3 and "--carry-over" in proc.stderr
    assert snapshot(repo) == before

    proc = verify(repo)
    assert proc.returncode == 3
    assert "index.json: signed under root 1 by a key root 2 no longer names" in proc.stderr
    assert "--carry-over" in proc.stderr
    assert len(errors(proc)) == 1  # its files are not a finding each

    proc = tmplbuild("repo", "resign", str(repo), "--carry-over", "--key", keys["online-2"], "--gnupghome",
                     str(keys.home))
    assert proc.returncode == 0, proc.stderr
    assert "warning: the index in place was signed under root 1" in proc.stderr
    assert "re-signed 3 file signature(s)" in proc.stderr  # tarball, manifest, SHA256SUMS.gpg
    assert signer_of(repo, keys) == "online-2" and index_of(repo)["version"] == 3
    proc = verify(repo)
    assert proc.returncode == 0, proc.stderr
    got = gpgv_sums(tmp_path, repo, f"templates/demo/{V1}", keys["online-2"])
    assert got.returncode == 0, got.stderr

    proc = publish_as(repo, who(keys, "online-2"), art)
    assert proc.returncode == 0, proc.stderr
    assert index_of(repo)["version"] == 4 and verify(repo).returncode == 0


def test_what_a_thief_published_with_the_stolen_key_is_removed(tmp_path, keys):
    repo = legacy_repo(tmp_path, keys)
    install(repo, keys, 1, ("online-1",))
    # The thief holds online-1 (and the upload path): publishes a template of their own.
    evil = make_artifact(tmp_path / "evil", name="evil", version=V2, payload="backdoor\n")
    assert publish_as(repo, who(keys, "online-1"), evil).returncode == 0
    assert (repo / f"templates/evil/{V2}").is_dir()
    install(repo, keys, 2, ("online-2",))

    argv = ("repo", "remove", str(repo), "evil", V2, "--key", keys["online-2"], "--gnupghome", str(keys.home))
    before = snapshot(repo)
    proc = tmplbuild(*argv)
    assert proc.returncode == 3 and "--carry-over" in proc.stderr
    assert snapshot(repo) == before
    proc = tmplbuild(*argv[:5], "--arch", "arm64", *argv[5:], "--carry-over")
    assert proc.returncode == 2 and "evil 12-20261130 arm64: not in the index" in proc.stderr
    assert snapshot(repo) == before

    proc = tmplbuild(*argv, "--carry-over")
    assert proc.returncode == 0, proc.stderr
    assert f"removed evil {V2} amd64" in proc.stdout and "warning:" in proc.stderr
    assert not (repo / "templates/evil").exists()
    doc = index_of(repo)
    assert [(e["name"], e["version"]) for e in doc["templates"]] == [("demo", V1)]
    assert signer_of(repo, keys) == "online-2"
    proc = verify(repo)
    assert proc.returncode == 0, proc.stderr
    # The repository is back in the hands of the new key: remove needs no --carry-over now.
    assert publish_as(repo, who(keys, "online-2"), make_artifact(tmp_path / "v3", version=V3)).returncode == 0
    proc = tmplbuild("repo", "remove", str(repo), "demo", V3, "--key", keys["online-2"], "--gnupghome",
                     str(keys.home))
    assert proc.returncode == 0 and f"removed demo {V3} amd64" in proc.stdout, proc.stderr
    assert verify(repo).returncode == 0


def test_repo_verify_audits_the_chain(tmp_path, keys):
    repo = legacy_repo(tmp_path, keys)
    install(repo, keys, 1, ("online-1",))
    install(repo, keys, 2, ("online-1",))
    assert verify(repo).returncode == 0
    # A root file past the end of the chain, or a tampered root, is an authenticity finding.
    shutil.copy(repo / "root/2.root.json", repo / "root/4.root.json")
    proc = verify(repo)
    assert proc.returncode == 3 and "root/4.root.json after a gap" in proc.stderr
    (repo / "root/4.root.json").unlink()
    doc = json.loads((repo / "root/2.root.json").read_bytes())
    doc["roles"]["index"]["threshold"] = 1  # the same value, other bytes: the signatures no longer match
    (repo / "root/2.root.json").write_text(json.dumps(doc))
    proc = verify(repo)
    assert proc.returncode == 3 and "root signature" in proc.stderr, proc.stderr


def test_a_new_repository_can_start_with_its_root(tmp_path, keys):
    repo = tmp_path / "repo"
    repo.mkdir()
    install(repo, keys, 1, ("online-1",))
    init = ("repo", "init", str(repo), "--gnupghome", str(keys.home), "--id", "test-repo")
    proc = tmplbuild(*init, "--key", keys["online-2"])
    assert proc.returncode == 3 and "is not an online key of root 1" in proc.stderr
    assert not (repo / "index.json").exists()
    proc = tmplbuild(*init, "--key", keys["online-1"])
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (repo / "keys").iterdir()) == [f"{keys['online-1']}.asc"]
    assert publish_as(repo, who(keys, "online-1"), make_artifact(tmp_path / "v1")).returncode == 0
    proc = verify(repo, "--root-key", keys["root-a"], "--root-key", keys["root-b"])
    assert proc.returncode == 0, proc.stderr
