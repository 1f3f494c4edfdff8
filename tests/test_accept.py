"""tmplbuild.repo.accept, the one index acceptance module: the client, the server's upload check, the server's
page and `tmplbuild repo verify` agree on the expiry boundary (expired iff now >= expires) because they all ask
it; the lifetime of an index is bounded; the upload successor rule."""
from __future__ import annotations

import types

import pytest

from tests.test_client import FakeVerifier
from tests.test_repo import key, repo, tmplbuild  # noqa: F401 (fixtures)
from tests.test_server import V1, World, world  # noqa: F401 (fixture)
from tmplbuild.client import trust
from tmplbuild.errors import AuthenticityError, FreshnessError, UsageError
from tmplbuild.repo import accept
from tmplbuild.repo import index as idx

GEN = 1_800_000_000


def index_at(expires: int, generated: int = GEN, version: int = 5) -> idx.Index:
    return idx.Index(repo_id="r", version=version, generated=idx.stamp(generated), expires=idx.stamp(expires))


# -- the boundary, in the module and in each of the four places --------------------------------------------------

def test_expired_iff_now_is_at_or_after_expires():
    index = index_at(GEN + 3600)
    assert not accept.is_expired(index, GEN + 3599) and not accept.is_expired(index, GEN + 3599.999)
    assert accept.is_expired(index, GEN + 3600) and accept.is_expired(index, GEN + 3601)
    accept.check_fresh(index, GEN + 3599)
    with pytest.raises(FreshnessError, match="index expired"):
        accept.check_fresh(index, GEN + 3600)
    # from the future: more than MAX_CLOCK_SKEW ahead, not at it
    accept.check_fresh(index, GEN - accept.MAX_CLOCK_SKEW)
    with pytest.raises(FreshnessError, match="index from the future"):
        accept.check_fresh(index, GEN - accept.MAX_CLOCK_SKEW - 1)


def _client_expired(data: bytes, now: float) -> bool:
    try:
        trust.check_index(data, b"sig", FakeVerifier(), pinned_repo_id=None, last=None, now=now)
    except FreshnessError as exc:
        assert exc.check == "index expired"
        return True
    return False


def _page_expired(snapshot, now: float, monkeypatch) -> bool:
    from repo_server import verified

    monkeypatch.setattr(verified, "time", types.SimpleNamespace(time=lambda: now, sleep=lambda s: None))
    return snapshot.expired


def _upload_status(world: World, now: float, monkeypatch) -> tuple[int, dict]:
    """POST world.b's upload to an in-process server whose clock reads `now` (version 3 onto version 2)."""
    from repo_server import create_app, upload

    monkeypatch.setattr(upload, "time", types.SimpleNamespace(time=lambda: now))
    app = create_app({"REPO": str(world.a), "TOKEN": world.token})
    body = world.body()
    r = app.test_client().post("/api/v1/publish", data=body, headers={
        "Authorization": f"Bearer {world.token}", "Content-Type": "application/x-tar",
        "Content-Length": str(len(body))})
    return r.status_code, r.get_json()


def test_the_four_places_agree_at_the_exact_boundary_second(world, monkeypatch):
    """Client (trust.check_index), the server's page (Snapshot.expired), `repo verify` (manage.audit) and the
    server's upload check all call now == expires expired, and one second earlier not. Before accept.py the
    page and `repo verify` used `<` and called the boundary second still valid."""
    from repo_server import verified
    from tmplbuild.repo import manage, store

    new_data = (world.b / "index.json").read_bytes()
    new = idx.parse(new_data)
    expires = idx.parse_stamp(new.expires)
    served = idx.parse((world.a / "index.json").read_bytes())
    served_expires = idx.parse_stamp(served.expires)

    # 1. the client
    assert _client_expired(new_data, expires) and not _client_expired(new_data, expires - 1)
    # 2. the server's page
    snap = verified.Snapshot(index=served, data=b"", doc={})
    assert _page_expired(snap, served_expires, monkeypatch)
    assert not _page_expired(snap, served_expires - 1, monkeypatch)
    # 3. repo verify
    keys = store.read_keys(world.a)
    at = manage.audit(world.a, keys.public_keys, keys.fingerprints, now=served_expires)
    before = manage.audit(world.a, keys.public_keys, keys.fingerprints, now=served_expires - 1)
    assert at == [f"index.json: expired at {served.expires}"] and before == []
    # 4. the server's upload check: refused at the boundary second, accepted one second earlier
    status, reply = _upload_status(world, expires, monkeypatch)
    assert status == 422 and reply["error"] == f"index.json: expired at {new.expires}"
    assert idx.parse((world.a / "index.json").read_bytes()).version == 2
    status, reply = _upload_status(world, expires - 1, monkeypatch)
    assert status == 200 and reply["version"] == 3, reply


# -- lifetime ----------------------------------------------------------------------------------------------------

def _schema_error(data: bytes) -> str:
    with pytest.raises(AuthenticityError) as info:
        idx.parse(data)
    assert info.value.check == "index schema"
    return info.value.message


def test_lifetime_is_bounded_and_expires_must_follow_generated():
    assert idx.parse(index_at(GEN + idx.MAX_LIFETIME).to_bytes()).version == 5
    assert "lifetime" in _schema_error(index_at(GEN + idx.MAX_LIFETIME + 1).to_bytes())
    assert "not after generated" in _schema_error(index_at(GEN).to_bytes())
    assert "not after generated" in _schema_error(index_at(GEN - 60).to_bytes())


def test_the_cli_defaults_are_inside_the_maximum_lifetime():
    import argparse

    from tmplbuild.cli import parse_duration, parser

    assert parse_duration("30d") <= idx.MAX_LIFETIME and parse_duration("1y") <= idx.MAX_LIFETIME
    defaults, todo = [], [parser()]
    while todo:
        for action in todo.pop()._actions:
            if isinstance(action, argparse._SubParsersAction):
                todo.extend(action.choices.values())
            elif action.dest == "expires_in":
                defaults.append(action.default)
    assert defaults and all(parse_duration(d) <= idx.MAX_LIFETIME for d in defaults), defaults


def test_successor_refuses_a_lifetime_clients_would_refuse():
    cur = index_at(GEN + 60)
    assert cur.successor((), idx.MAX_LIFETIME, now=GEN).version == 6
    with pytest.raises(UsageError, match="lifetime"):
        cur.successor((), idx.MAX_LIFETIME + 1, now=GEN)


def test_repo_init_and_resign_refuse_an_index_lifetime_over_the_maximum(tmp_path, key, repo):  # noqa: F811
    home, fpr = key
    proc = tmplbuild("repo", "init", str(tmp_path / "long"), "--key", fpr, "--gnupghome", str(home), "--id", "x",
                     "--expires-in", "400d")
    assert proc.returncode == 2 and "lifetime" in proc.stderr, proc.stderr
    assert not (tmp_path / "long" / "index.json").exists()
    before = (repo / "index.json").read_bytes()
    proc = tmplbuild("repo", "resign", str(repo), "--key", fpr, "--gnupghome", str(home), "--expires-in", "2y")
    assert proc.returncode == 2 and "lifetime" in proc.stderr, proc.stderr
    assert (repo / "index.json").read_bytes() == before
    proc = tmplbuild("repo", "resign", str(repo), "--key", fpr, "--gnupghome", str(home), "--expires-in", "1y")
    assert proc.returncode == 0, proc.stderr


# -- successor and rollback --------------------------------------------------------------------------------------

def test_successor_is_exactly_one_up_in_the_same_repository():
    old = index_at(GEN + 60, version=7)
    accept.check_successor(old, index_at(GEN + 60, version=8))
    for v in (6, 7, 9):
        assert not accept.is_successor(old, index_at(GEN + 60, version=v))
        with pytest.raises(FreshnessError, match="index version"):
            accept.check_successor(old, index_at(GEN + 60, version=v))
    other = idx.Index(repo_id="other", version=8, generated=old.generated, expires=old.expires)
    with pytest.raises(AuthenticityError, match="repo id"):
        accept.check_successor(old, other)


def test_rollback_bar():
    index = index_at(GEN + 60, version=7)
    accept.check_not_rolled_back(None, index, "a" * 64)
    accept.check_not_rolled_back(accept.Seen("r", 6, "b" * 64), index, "a" * 64)
    accept.check_not_rolled_back(accept.Seen("r", 7, "a" * 64), index, "a" * 64)
    accept.check_not_rolled_back(accept.Seen("elsewhere", 9, "b" * 64), index, "a" * 64)
    with pytest.raises(FreshnessError, match="expected at least 8"):
        accept.check_not_rolled_back(accept.Seen("r", 8, "b" * 64), index, "a" * 64)
    with pytest.raises(FreshnessError, match="same version"):
        accept.check_not_rolled_back(accept.Seen("r", 7, "b" * 64), index, "a" * 64)


def test_trust_keeps_its_public_names():
    assert trust.Seen is accept.Seen and trust.TrustedIndex is accept.TrustedIndex
    assert trust.MAX_CLOCK_SKEW == accept.MAX_CLOCK_SKEW
    for name in ("check_index", "select", "check_file", "check_cap", "find_file", "created_time", "INDEX_CAP",
                 "SIGNATURE_CAP"):
        assert hasattr(trust, name), name


def test_publish_refuses_an_overlong_lifetime_before_booting_or_writing_anything(tmp_path, key, repo):  # noqa: F811
    from tests.test_repo import make_artifact

    home, fpr = key
    manifest = make_artifact(tmp_path / "out")
    before = sorted(p.relative_to(repo) for p in repo.rglob("*"))
    # Without --skip-test the publish would boot the template first: the lifetime is refused before that.
    proc = tmplbuild("publish", str(manifest), "--repo", str(repo), "--key", fpr, "--gnupghome", str(home),
                     "--expires-in", "400d")
    assert proc.returncode == 2 and "lifetime" in proc.stderr and "template test" not in proc.stderr, proc.stderr
    assert sorted(p.relative_to(repo) for p in repo.rglob("*")) == before


def test_repo_verify_reports_an_index_from_the_future_as_freshness(tmp_path, key, repo):  # noqa: F811
    """A finding's kind, not its wording, decides the exit code: only freshness findings give 4."""
    import time

    from tmplbuild.repo import manage, store

    keys = store.read_keys(repo)
    current = idx.parse((repo / "index.json").read_bytes())
    generated = idx.parse_stamp(current.generated)
    found = manage.audit(repo, keys.public_keys, keys.fingerprints, now=generated - accept.MAX_CLOCK_SKEW - 60)
    assert [f.kind for f in found] == [manage.Finding.FRESHNESS] and "ahead of this clock" in found[0]
    assert manage.audit(repo, keys.public_keys, keys.fingerprints, now=time.time()) == []
    (repo / "templates").mkdir(exist_ok=True)
    (repo / "templates" / "stray").write_text("x")
    found = manage.audit(repo, keys.public_keys, keys.fingerprints)
    assert [f.kind for f in found] == [manage.Finding.UNLISTED]
    proc = tmplbuild("repo", "verify", str(repo))
    assert proc.returncode == 3 and "--repair" in proc.stderr, proc.stderr
