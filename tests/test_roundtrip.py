"""Maintainer to node admin over real HTTP: `publish --to` a running `tmplbuild serve`, then `fetch` and
`verify` with the pinned key, all through the command line."""
from __future__ import annotations

import json

from tests.test_repo import index_of, key, make_artifact, repo, tmplbuild  # noqa: F401 - fixtures
from tests.test_server import Server

TOKEN = "0123456789abcdef0123456789abcdef"


def upload(server: Server, key, token_file, *artifacts):
    home, fpr = key
    return tmplbuild("publish", "--skip-test", *map(str, artifacts), "--to", server.base, "--token-file", str(token_file),
                     "--key", fpr, "--gnupghome", str(home))


def test_publish_to_a_server_then_fetch_and_verify(tmp_path, repo, key):
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    token.chmod(0o600)
    server = Server(repo, tmp_path / "logs", "--token-file", str(token))
    try:
        first = upload(server, key, token, make_artifact(tmp_path / "a", version="12-20261120"))
        assert first.returncode == 0, first.stderr
        second = upload(server, key, token, make_artifact(tmp_path / "b", version="12-20261130", payload="new\n"))
        assert second.returncode == 0, second.stderr
        assert index_of(repo)["version"] == 3
        assert tmplbuild("repo", "verify", str(repo)).returncode == 0  # what the server wrote is a clean repository
        # The maintainer's tmplbuild made the delta from the version on the server (downloaded and checked).
        newest = next(t for t in index_of(repo)["templates"] if t["version"] == "12-20261130")
        assert [f["delta"]["base_version"] for f in newest["files"] if f["format"] == "tar.zst.delta"] == \
            ["12-20261120"]

        _, fpr = key
        dest = tmp_path / "cache"
        dest.mkdir()
        env = {"TMPLBUILD_STATE_DIR": str(tmp_path / "state"), "TMPLBUILD_CONFIG_DIR": str(tmp_path / "config")}
        pin = ["--url", server.base, "--key", str(repo / f"keys/{fpr}.asc"), "--fingerprint", fpr]
        older = tmplbuild("fetch", "demo", "--version", "12-20261120", "--arch", "amd64", "--dest", str(dest), *pin,
                          env=env)
        assert older.returncode == 0, older.stderr
        fetched = tmplbuild("fetch", "demo", "--arch", "amd64", "--dest", str(dest), "--json", *pin, env=env)
        assert fetched.returncode == 0, fetched.stderr
        assert json.loads(fetched.stdout)["delta"]["base_version"] == "12-20261120"
        got = dest / "demo_12-20261130_amd64.tar.zst"  # the newest version, under the name pct expects
        assert got.read_bytes() == (repo / "templates/demo/12-20261130" / got.name).read_bytes()
        assert tmplbuild("verify", str(got), *pin, env=env).returncode == 0
        listing = tmplbuild("list", "--json", *pin, env=env)
        assert [t["version"] for t in json.loads(listing.stdout)["templates"]] == ["12-20261120", "12-20261130"]
    finally:
        server.stop()


def test_publish_to_with_a_wrong_token_is_refused_and_changes_nothing(tmp_path, repo, key):
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-token-at-all-0123456789\n")
    before = (repo / "index.json").read_bytes()
    server = Server(repo, tmp_path / "logs", "--token-file", str(token))
    try:
        proc = upload(server, key, wrong, make_artifact(tmp_path / "a"))
        assert proc.returncode == 2 and "401" in proc.stderr
        assert (repo / "index.json").read_bytes() == before
    finally:
        server.stop()
