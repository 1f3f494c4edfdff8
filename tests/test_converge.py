"""A repository converges back on its signed index (issue 11).

A publish that dies (or whose disk fills) after its files were renamed into templates/<name>/<version>/ and before
the index swap leaves files served that no signed index lists, and `repo verify` failed from then on. Here: the
next publish (local and on the server), the server's start and `repo verify --repair` remove such leftovers,
under the repository lock and never touching what the current index lists; a full disk on the server is 507 with
nothing left behind, and `publish --to` says so in one line (exit 5: the failure is the remote's answer, not this
host's disk); no refused or failed publish leaves an empty directory.

Crashes are simulated in-process (a BaseException raised where the process would die, so no clean-up runs) and
once for real (the existing TMPLBUILD_FAULT crash point, os._exit); full disks both by an injected
OSError(ENOSPC) and for real on a 2 MiB tmpfs (skipped when it cannot be mounted)."""
from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

from tests.conftest import ROOT, fill, small_disk  # noqa: F401 - fixture
from tests.test_repo import index_of, key, make_artifact, publish, repo, tmplbuild  # noqa: F401 - fixtures
from tests.test_server import V1, V2, Server, running, snapshot, tar_bytes, upload_members, world  # noqa: F401
from tmplbuild.errors import LocalIOError
from tmplbuild.repo import store

V3 = "12-20261210"
WEEK = 7 * 86400


class Crash(BaseException):
    """The process dies here: raised where a SIGKILL would strike, it bypasses every `except Exception`
    clean-up, as a real crash does."""


def crash_publish(root: Path, key, manifest: Path, monkeypatch) -> None:
    """A local publish (the library, in-process) that dies after renaming its files into place, before the
    index swap."""
    from tmplbuild.repo import publish as pub
    from tmplbuild.sign import Signer

    def die(*_args, **_kw):
        raise Crash()

    home, fpr = key
    with monkeypatch.context() as m, Signer(home, fpr) as signer:
        m.setattr(store, "write_index", die)
        with pytest.raises(Crash):
            pub.publish(root, [manifest], signer, WEEK)


def verify(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return tmplbuild("repo", "verify", str(root), *args)


def empty_dirs(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in (root / "templates").rglob("*")
                  if p.is_dir() and not p.is_symlink() and not any(p.iterdir()))


def leftovers(root: Path) -> list[str]:
    """Staging of any kind: .pending, .upload-*, .part files."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                  if p.name == store.PENDING or p.name.startswith(".upload-") or p.name.endswith(".part"))


def disk_full_error(path) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def failing_open(predicate):
    """An `open` for a module's globals that fails with ENOSPC on the first write to a path `predicate` picks,
    after part of the data reached the file (as a full disk does)."""
    import builtins

    class Full:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            self.f.write(bytes(data[: len(data) // 2]))
            raise disk_full_error(self.f.name)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def chooser(path, mode="r", *args, **kw):
        if ("w" in mode or "x" in mode) and predicate(Path(path)):
            return Full(builtins.open(path, mode, *args, **kw))
        return builtins.open(path, mode, *args, **kw)

    return chooser


def assert_one_line_507(stderr: str) -> None:
    """`publish --to` reports the server's full disk in one line (after --skip-test's own warning)."""
    errors = [ln for ln in stderr.splitlines() if "--skip-test" not in ln]
    assert len(errors) == 1, stderr
    assert errors[0].startswith("tmplbuild: upload: the server answered 507: the server's disk is full "
                                "(No space left on device): nothing was published"), stderr


# ---------------------------------------------------------------------------------------------- local


def test_a_publish_killed_before_its_index_swap_is_cleaned_up_by_the_next_publish(tmp_path, repo, key,
                                                                                    monkeypatch):
    assert publish(repo, key, make_artifact(tmp_path / "v1")).returncode == 0
    before = (repo / "index.json").read_bytes()
    crash_publish(repo, key, make_artifact(tmp_path / "v2", version=V2, payload="new\n"), monkeypatch)
    left = repo / f"templates/demo/{V2}"
    assert (left / f"demo_{V2}_amd64.tar.zst").is_file()  # served, but listed nowhere
    assert (repo / "index.json").read_bytes() == before

    proc = verify(repo)
    assert proc.returncode == 3
    assert "served but not listed" in proc.stderr and f"repo verify --repair {repo}" in proc.stderr

    # Another template entirely (not a retry of the one that died): the repository converges anyway.
    proc = publish(repo, key, make_artifact(tmp_path / "o", name="other"))
    assert proc.returncode == 0, proc.stderr
    assert f"cleaned up: removed templates/demo/{V2}/demo_{V2}_amd64.tar.zst" in proc.stdout
    assert not left.exists() and empty_dirs(repo) == []
    assert [(t["name"], t["version"]) for t in index_of(repo)["templates"]] == [("demo", V1), ("other", V1)]
    proc = verify(repo)
    assert proc.returncode == 0, proc.stderr


def test_a_publish_really_killed_before_its_index_swap_converges_on_the_next_publish(tmp_path, repo, key):
    assert publish(repo, key, make_artifact(tmp_path / "v1")).returncode == 0
    proc = publish(repo, key, make_artifact(tmp_path / "v2", version=V2, payload="new\n"),
                   env={"TMPLBUILD_FAULT": "before-index"})
    assert proc.returncode == 137  # os._exit: no clean-up of any kind
    assert verify(repo).returncode == 3
    assert publish(repo, key, make_artifact(tmp_path / "v3", version=V3, payload="3\n")).returncode == 0
    assert not (repo / f"templates/demo/{V2}").exists()
    assert verify(repo).returncode == 0


def test_repair_puts_back_the_sums_of_a_directory_a_killed_publish_added_an_arch_to(tmp_path, repo, key,
                                                                                  monkeypatch):
    assert publish(repo, key, make_artifact(tmp_path / "amd")).returncode == 0
    d = repo / f"templates/demo/{V1}"
    pair = (d / "SHA256SUMS").read_bytes(), (d / "SHA256SUMS.gpg").read_bytes()
    crash_publish(repo, key, make_artifact(tmp_path / "arm", arch="arm64", payload="arm\n"), monkeypatch)
    assert b"arm64" in (d / "SHA256SUMS").read_bytes()  # the new pair went in, the index did not
    proc = verify(repo)
    assert proc.returncode == 3 and "SHA256SUMS: does not match the index" in proc.stderr
    assert "--repair" in proc.stderr

    proc = verify(repo, "--repair")
    assert proc.returncode == 0, proc.stderr
    assert f"repaired: removed templates/demo/{V1}/demo_{V1}_arm64.tar.zst (not listed in the index)" \
        in proc.stdout
    assert f"repaired: restored templates/demo/{V1}/SHA256SUMS and SHA256SUMS.gpg" in proc.stdout
    assert proc.stdout.rstrip().endswith(": ok")
    assert ((d / "SHA256SUMS").read_bytes(), (d / "SHA256SUMS.gpg").read_bytes()) == pair
    assert not list(d.glob("*arm64*")) and not list(d.glob(".*"))
    assert verify(repo, "--repair").stdout == f"{repo}: ok\n"  # nothing left to do


def test_repair_reports_what_it_removes_and_quarantines_and_spares_listed_and_in_flight(tmp_path, repo, key):
    from repo_server import safety

    assert publish(repo, key, make_artifact(tmp_path / "v1")).returncode == 0
    (repo / ".upload-stale").mkdir()
    (repo / ".upload-stale/x").write_bytes(b"x")
    busy = repo / ".upload-busy"
    busy.mkdir()
    fd = safety.lock_dir(busy)  # an upload a server is receiving right now
    try:
        (repo / f"templates/demo/{V3}/sub").mkdir(parents=True)
        (repo / f"templates/demo/{V3}/demo_{V3}_amd64.tar.zst").write_bytes(b"junk")
        (repo / "templates/empty/1").mkdir(parents=True)
        (repo / "notes.txt").write_text("the admin's\n")
        (repo / "templates/.admin").write_text("not served, not a publisher's\n")
        (repo / "templates/demo/.cache").mkdir()
        (repo / "templates/demo/.cache/x").write_text("not served either\n")
        proc = publish(repo, key, make_artifact(tmp_path / "o", name="other"))  # the automatic clean-up
        assert proc.returncode == 0, proc.stderr
        assert f"cleaned up: removed templates/demo/{V3}/demo_{V3}_amd64.tar.zst" in proc.stdout
        assert (repo / "notes.txt").is_file() and (repo / ".upload-stale").is_dir()  # --repair's business
        listed = {k: v for k, v in snapshot(repo).items() if k != "notes.txt"}
        (repo / f"templates/demo/{V3}/sub").mkdir(parents=True)
        (repo / f"templates/demo/{V3}/demo_{V3}_amd64.tar.zst").write_bytes(b"junk")
        (repo / "templates/empty/1").mkdir(parents=True)
        (repo / ".pending").mkdir()
        (repo / ".pending/index.json").write_bytes(b"{")  # a pair that was never complete
        proc = verify(repo)
        assert proc.returncode == 3 and "notes.txt: served but not listed" in proc.stderr
        assert "--repair" in proc.stderr

        proc = verify(repo, "--repair")
        assert proc.returncode == 0, proc.stderr
        out = proc.stdout
        for line in ("removed .pending/, an index pair that was never complete",
                     "removed .upload-stale/, left by an interrupted upload",
                     f"removed templates/demo/{V3}/demo_{V3}_amd64.tar.zst (not listed in the index)",
                     f"removed empty directory templates/demo/{V3}/sub/",
                     f"removed empty directory templates/demo/{V3}/",
                     "removed empty directory templates/empty/", "quarantined notes.txt (not listed in the index)"):
            assert f"repaired: {line}" in out, (line, out)
        assert snapshot(repo) == listed  # every listed file, byte for byte and untouched
        assert (repo / "templates/.admin").is_file() and (repo / "templates/demo/.cache/x").is_file()
        assert busy.is_dir()  # an upload in flight is not a leftover
        assert [p.read_text() for p in (repo / ".quarantine").rglob("notes.txt")] == ["the admin's\n"]
        assert empty_dirs(repo) == [] and not (repo / ".pending").exists()
    finally:
        os.close(fd)


def test_repair_waits_for_a_publisher_holding_the_lock(tmp_path, repo, key):
    """A local publisher stages .part files under templates/ while it holds the lock: --repair takes the same
    lock first, so it never removes a publisher's work in progress."""
    assert publish(repo, key, make_artifact(tmp_path / "v1")).returncode == 0
    d = repo / f"templates/demo/{V2}"
    with store.locked(repo):
        d.mkdir(parents=True)
        part = d / f".demo_{V2}_amd64.tar.zst.part"
        part.write_bytes(b"being written")
        proc = subprocess.Popen([sys.executable, "-m", "tmplbuild", "repo", "verify", "--repair", str(repo)],
                                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(2)
        assert proc.poll() is None and part.read_bytes() == b"being written"
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert not d.exists() and "removed empty directory" in out


def test_a_prune_killed_halfway_is_finished_by_the_next_resign(tmp_path, repo, key, monkeypatch):
    """prune writes the new index first, then deletes and re-signs the SHA256SUMS of a directory other arches
    still use: killed in between, that pair lists files that are gone. Only a signer can fix that; `repo
    resign` (what CI runs) now does."""
    from tmplbuild.repo import manage
    from tmplbuild.sign import Signer

    for out, kw in (("a1", {}), ("r1", {"arch": "arm64"}), ("a2", {"version": V2})):
        assert publish(repo, key, make_artifact(tmp_path / out, **kw)).returncode == 0

    def die(*_a, **_kw):
        raise Crash()

    home, fpr = key
    with monkeypatch.context() as m, Signer(home, fpr) as signer:
        m.setattr(manage, "_write_sums", die)
        with pytest.raises(Crash):
            manage.prune(repo, 1, signer, WEEK)
    assert not (repo / f"templates/demo/{V1}/demo_{V1}_amd64.tar.zst").exists()
    proc = verify(repo)
    assert proc.returncode == 3 and f"templates/demo/{V1}/SHA256SUMS: does not match the index" in proc.stderr
    home, fpr = key
    proc = tmplbuild("repo", "resign", str(repo), "--key", fpr, "--gnupghome", str(home))
    assert proc.returncode == 0, proc.stderr
    proc = verify(repo)
    assert proc.returncode == 0, proc.stderr


def test_a_refused_local_publish_leaves_no_empty_directory(tmp_path, repo, key):
    manifest = make_artifact(tmp_path / "out", name="fresh")
    tarball = tmp_path / f"out/fresh_{V1}_amd64.tar.zst"
    tarball.write_bytes(tarball.read_bytes() + b"changed after the build")
    proc = publish(repo, key, manifest)
    assert proc.returncode == 3, proc.stderr
    assert not (repo / "templates/fresh").exists()
    assert empty_dirs(repo) == [] and leftovers(repo) == []
    assert verify(repo).returncode == 0


def test_a_full_disk_while_a_local_publish_writes_the_index_takes_everything_back(tmp_path, repo, key,
                                                                                 monkeypatch):
    from tmplbuild.repo import publish as pub
    from tmplbuild.sign import Signer

    assert publish(repo, key, make_artifact(tmp_path / "v1")).returncode == 0
    before = snapshot(repo)
    monkeypatch.setattr(store, "open", failing_open(lambda p: p.parent.name == store.PENDING
                                                    and p.name == store.INDEX_SIG), raising=False)
    home, fpr = key
    with Signer(home, fpr) as signer, pytest.raises(LocalIOError) as exc:
        pub.publish(repo, [make_artifact(tmp_path / "v2", version=V2, payload="new\n")], signer, WEEK)
    assert store.disk_full(exc.value) and exc.value.exit_code == 7
    monkeypatch.undo()
    assert snapshot(repo) == before
    assert not (repo / f"templates/demo/{V2}").exists() and leftovers(repo) == [] and empty_dirs(repo) == []
    assert verify(repo).returncode == 0


# ---------------------------------------------------------------------------------------------- server


def test_server_start_removes_what_a_killed_publish_left(world, running, monkeypatch):
    crash_publish(world.a, world.key, make_artifact(world.tmp / "v3", version=V3, payload="3\n"), monkeypatch)
    left = f"templates/demo/{V3}/demo_{V3}_amd64.tar.zst"
    assert (world.a / left).is_file() and verify(world.a).returncode == 3
    server = running()
    assert not (world.a / f"templates/demo/{V3}").exists()
    assert f"start-up: removed {left} (not listed in the index), left by an interrupted publish" \
        in server.err.read_text()
    assert requests.get(server.url("/" + left), timeout=10).status_code == 404
    listed = f"templates/demo/{V1}/demo_{V1}_amd64.tar.zst"
    assert requests.get(server.url("/" + listed), timeout=10).content == (world.a / listed).read_bytes()
    assert verify(world.a).returncode == 0


def test_server_start_never_cleans_up_against_an_index_that_does_not_verify(world):
    from repo_server import create_app

    stray = world.a / f"templates/demo/{V3}/demo_{V3}_amd64.tar.zst"
    stray.parent.mkdir(parents=True)
    stray.write_bytes(b"x")
    data = (world.a / "index.json").read_bytes()
    (world.a / "index.json").write_bytes(data.replace(b"demo template", b"evil template"))
    create_app({"REPO": str(world.a)})
    assert stray.is_file()  # no signed truth to converge on: nothing is removed
    (world.a / "index.json").write_bytes(data)
    create_app({"REPO": str(world.a)})
    assert not stray.parent.exists()


def app_client(world):
    from repo_server import create_app

    return create_app({"REPO": str(world.a), "TOKEN": world.token}).test_client()


def post_in_process(client, world, body: bytes):
    return client.post("/api/v1/publish", data=body, headers={
        "Authorization": f"Bearer {world.token}", "Content-Type": "application/x-tar"})


def test_a_server_upload_removes_what_a_killed_publish_left(world, monkeypatch):
    client = app_client(world)
    crash_publish(world.a, world.key, make_artifact(world.tmp / "v3", version=V3, payload="3\n"), monkeypatch)
    assert verify(world.a).returncode == 3
    r = post_in_process(client, world, world.body())
    assert r.status_code == 200, r.json
    assert not (world.a / f"templates/demo/{V3}").exists()
    assert verify(world.a).returncode == 0


def test_a_server_killed_between_moving_files_in_and_the_index_swap_converges(world, monkeypatch):
    client = app_client(world)

    def die(*_a, **_kw):
        raise Crash()

    with monkeypatch.context() as m:
        m.setattr(store, "write_index", die)
        with pytest.raises(Crash):
            post_in_process(client, world, world.body())
    assert (world.a / f"templates/demo/{V2}/demo_{V2}_amd64.tar.zst").is_file()
    assert verify(world.a).returncode == 3
    app_client(world)  # the server's next start
    assert not (world.a / f"templates/demo/{V2}").exists() and empty_dirs(world.a) == []
    assert verify(world.a).returncode == 0


@pytest.mark.parametrize("where", ["index", "files"])
def test_a_full_disk_on_the_server_is_507_and_leaves_nothing(world, monkeypatch, where):
    from repo_server import upload

    client = app_client(world)
    before = snapshot(world.a)
    if where == "index":  # the upload was checked and moved in; the index pair does not fit
        monkeypatch.setattr(store, "open", failing_open(lambda p: p.parent.name == store.PENDING
                                                        and p.name == store.INDEX_SIG), raising=False)
    else:  # the upload's own files, while they stream in
        monkeypatch.setattr(upload, "open", failing_open(lambda p: p.name.endswith(".tar.zst")), raising=False)
    r = post_in_process(client, world, world.body())
    assert r.status_code == 507, r.json
    assert "the server's disk is full" in r.json["error"] and "nothing was published" in r.json["error"]
    monkeypatch.undo()
    assert snapshot(world.a) == before
    assert leftovers(world.a) == [] and empty_dirs(world.a) == []
    assert not (world.a / f"templates/demo/{V2}").exists()
    assert verify(world.a).returncode == 0
    assert post_in_process(client, world, world.body()).status_code == 200  # the retry, with space again


def test_a_refused_server_upload_leaves_no_directory(world):
    client = app_client(world)
    members = [(n, d + b"!" if n.endswith(".tar.zst") else d) for n, d in upload_members(world.a, world.b)]
    assert post_in_process(client, world, tar_bytes(members)).status_code == 422
    assert not (world.a / f"templates/demo/{V2}").exists() and empty_dirs(world.a) == []
    assert leftovers(world.a) == []


def test_publish_to_a_server_whose_disk_is_full_exits_5_naming_507(world, monkeypatch):
    """The real `publish --to` against the in-process app (served by werkzeug on 127.0.0.1 in a thread, so
    that the full disk can be injected)."""
    from werkzeug.serving import make_server

    from repo_server import create_app

    app = create_app({"REPO": str(world.a), "TOKEN": world.token})
    monkeypatch.setattr(store, "open", failing_open(lambda p: p.parent.name == store.PENDING
                                                    and p.name == store.INDEX_SIG), raising=False)
    httpd = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    before = snapshot(world.a)
    try:
        home, fpr = world.key
        proc = tmplbuild("publish", "--skip-test", str(make_artifact(world.tmp / "v3", version=V3, payload="3\n")),
                         "--to", f"http://127.0.0.1:{httpd.server_port}", "--token-file", str(world.token_file),
                         "--key", fpr, "--gnupghome", str(home))
    finally:
        httpd.shutdown()
        thread.join(timeout=10)
        httpd.server_close()
    assert proc.returncode == 5, proc.stderr
    assert_one_line_507(proc.stderr)
    monkeypatch.undo()
    assert snapshot(world.a) == before and leftovers(world.a) == [] and empty_dirs(world.a) == []
    assert verify(world.a).returncode == 0


# ---------------------------------------------------------------------------------------------- real ENOSPC


def repo_on(disk: Path, world) -> Path:
    root = disk / "repo"
    shutil.copytree(world.a, root, ignore=shutil.ignore_patterns(".*"))
    return root


def test_a_really_full_disk_while_the_server_writes_the_index_is_507_and_leaves_nothing(world, small_disk,
                                                                                        monkeypatch):
    from repo_server import create_app

    root = repo_on(small_disk, world)
    client = create_app({"REPO": str(root), "TOKEN": world.token}).test_client()
    before = snapshot(root)
    real = store.write_index

    def fill_then_write(*args):  # the files are in place; the disk fills just before the index pair is written
        fill(small_disk)
        return real(*args)

    monkeypatch.setattr(store, "write_index", fill_then_write)
    r = post_in_process(client, world, world.body())
    assert r.status_code == 507, r.json
    monkeypatch.undo()
    assert snapshot(root) == before and leftovers(root) == [] and empty_dirs(root) == []
    assert verify(root).returncode == 0
    (small_disk / "filler").unlink()
    assert post_in_process(client, world, world.body()).status_code == 200
    assert verify(root).returncode == 0


def test_publish_to_a_real_server_on_a_full_disk_exits_5_and_leaves_nothing(world, small_disk):
    import secrets

    root = repo_on(small_disk, world)
    before = snapshot(root)
    fill(small_disk, leave=96 << 10)
    big = make_artifact(world.tmp / "big", version=V3, payload=secrets.token_hex(300_000))
    home, fpr = world.key
    server = Server(root, world.tmp / "logs", "--token-file", str(world.token_file))
    try:
        proc = tmplbuild("publish", "--skip-test", str(big), "--to", server.base, "--token-file",
                         str(world.token_file), "--key", fpr, "--gnupghome", str(home))
        assert proc.returncode == 5, proc.stderr
        assert_one_line_507(proc.stderr)
        assert snapshot(root) == before and leftovers(root) == [] and empty_dirs(root) == []
        assert verify(root).returncode == 0
        (small_disk / "filler").unlink()
        proc = tmplbuild("publish", "--skip-test", str(big), "--to", server.base, "--token-file",
                         str(world.token_file), "--key", fpr, "--gnupghome", str(home))
        assert proc.returncode == 0, proc.stderr
    finally:
        server.stop()
    assert verify(root).returncode == 0


def test_a_local_publish_onto_a_full_disk_exits_7_and_leaves_nothing(tmp_path, world, small_disk):
    import secrets

    root = repo_on(small_disk, world)
    before = snapshot(root)
    fill(small_disk, leave=96 << 10)
    proc = publish(root, world.key, make_artifact(tmp_path / "big", version=V3, payload=secrets.token_hex(300_000)))
    assert proc.returncode == 7, proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if "--skip-test" not in ln]
    assert len(errors) == 1 and "No space left on device" in errors[0], proc.stderr
    assert snapshot(root) == before and leftovers(root) == [] and empty_dirs(root) == []
    assert not (root / f"templates/demo/{V3}").exists()
    assert verify(root).returncode == 0
