"""The Flask application: downloads, the HTML page, the JSON API, health, and authenticated uploads.

Configuration (flaskr style): defaults, then the `config` mapping, then environment variables
TMPLBUILD_SERVER_REPO, TMPLBUILD_SERVER_TOKEN_FILE and TMPLBUILD_SERVER_MAX_UPLOAD.

    REPO        the repository directory (required)
    TOKEN       upload token (str or bytes), or None: uploads disabled
    TOKEN_FILE  file holding the upload token (first line); overrides TOKEN
    MAX_UPLOAD  largest accepted upload body in bytes (default 2 GiB)
    UPLOAD_IDLE_TIMEOUT  seconds an upload may stall before it is dropped (default 60; gunicorn only)

Everything per application lives in `app.extensions["tmplbuild"]` (a ServerState); nothing at module level."""
from __future__ import annotations

import hmac
import logging
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flask import Blueprint, Flask, Response, current_app, jsonify, render_template, request, send_from_directory
from werkzeug.exceptions import ClientDisconnected, HTTPException

from tmplbuild.client.config import REMOTE_NAME
from tmplbuild.client.documents import KINDS
from tmplbuild.errors import TmplbuildError, UsageError
from tmplbuild.oci import record
from tmplbuild.repo import index as idx
from tmplbuild.repo import root as rootdoc
from tmplbuild.repo import store
from tmplbuild.sbom import affected

from repo_server import safety, upload
from repo_server.verified import IndexCache, IndexUnavailable, Snapshot

GiB = 1 << 30
DEFAULTS: dict[str, Any] = {"REPO": None, "TOKEN": None, "TOKEN_FILE": None, "MAX_UPLOAD": 2 * GiB,
                            "UPLOAD_IDLE_TIMEOUT": 60.0}
ENV_PREFIX = "TMPLBUILD_SERVER_"
ENV_KEYS = ("REPO", "TOKEN_FILE", "MAX_UPLOAD")
TOKEN_RE = re.compile(rb"\A[\x21-\x7e]{16,4096}\Z")  # visible ASCII: it travels in an HTTP header

CONTENT_TYPES = (  # by suffix; send_file's guesses would call a .tar.zst "application/x-tar" + an encoding
    (".json", "application/json"),
    (".asc", "text/plain"),
    (".gpg", "application/pgp-signature"),
    (".zst", "application/zstd"),
    (".xz", "application/x-xz"),
)


@dataclass(frozen=True)
class ServerState:
    root: Path  # as configured (shown to people)
    root_real: str  # os.path.realpath(root): what every served path must stay inside
    token: bytes | None
    max_upload: int
    idle_timeout: float
    index: IndexCache


def create_app(config: Mapping[str, Any] | None = None) -> Flask:
    """The application. Raises UsageError (no or bad repository, bad token or limit: exit 2) and
    UnsafeContentError (private key material inside the repository: exit 6)."""
    app = Flask(__name__, static_folder=None)
    app.url_map.merge_slashes = False  # "//etc/passwd" is a 404 here, not a redirect to somewhere else
    app.config.from_mapping(DEFAULTS)
    if config is not None:
        app.config.from_mapping(config)
    for key in ENV_KEYS:
        if os.environ.get(ENV_PREFIX + key):
            app.config[key] = os.environ[ENV_PREFIX + key]
    if app.logger.level == logging.NOTSET:
        app.logger.setLevel(logging.INFO)  # publish lines are INFO

    root = _repo(app.config["REPO"])
    token = _token(app.config["TOKEN"], app.config["TOKEN_FILE"], app.logger)
    max_upload = _positive_int(app.config["MAX_UPLOAD"], "MAX_UPLOAD")
    app.config["MAX_CONTENT_LENGTH"] = max_upload  # werkzeug's own cap on the request stream, as a second fence

    # A crash mid-upload leaves REPO/.upload-*: swept before the scan (an upload in it is never served).
    safety.sweep_uploads(root, app.logger)
    safety.refuse_private_keys(root)  # before the clean-up: a private key in the tree is refused, not tidied away
    converge_at_start(root, app.logger)

    state = ServerState(root=root, root_real=os.path.realpath(root), token=token, max_upload=max_upload,
                        idle_timeout=float(app.config["UPLOAD_IDLE_TIMEOUT"]), index=IndexCache(root))
    app.extensions["tmplbuild"] = state
    if token is None:
        app.logger.warning("uploads disabled: no token configured")
    try:
        state.index.get()
    except IndexUnavailable as exc:
        app.logger.warning("%s; the page and the API answer 503 until it verifies", exc)
    app.register_blueprint(bp)
    return app


START_LOCK_TIMEOUT = 10.0  # seconds the start waits for a publisher's lock before it skips the clean-up


def converge_at_start(root: Path, log: logging.Logger) -> list[str]:
    """What a publish that died between moving its files in and swapping the index in left behind (served, but
    in no signed index), removed under the repository lock against the index as verified with the repository's
    trust as a publisher reads it (chain.repo_trust(root).base_verifier(): its root chain, or keys/), by
    tmplbuild.repo.converge. Nothing is removed when the index does not verify or the lock stays held (a local
    publisher at work, which converges itself): the server starts anyway and says so."""
    from tmplbuild.repo import chain
    from tmplbuild.repo.converge import converge

    try:
        with store.locked(root, timeout=START_LOCK_TIMEOUT) as done:
            with chain.repo_trust(root).base_verifier() as verifier:
                current, _ = store.load_index(root, verifier)
            done = done + converge(root, current)
    except (TmplbuildError, OSError) as exc:
        log.warning("start-up: leftovers of interrupted publishes not cleaned up: %s", exc)
        return []
    for line in done:
        log.warning("start-up: %s, left by an interrupted publish", line)
    return done


def _repo(value: Any) -> Path:
    if not value:
        raise UsageError("server config", "REPO is not set: give the repository directory")
    root = Path(value)
    if not root.is_dir():
        raise UsageError("repository", f"{root}: no such directory")
    if not (root / rootdoc.path(1)).is_file():
        store.read_keys(root)  # UsageError: no keys/<FPR>.asc (and no root of trust)
    if not (root / store.INDEX).is_file():
        raise UsageError("repository", f"{root}: no {store.INDEX}; run `tmplbuild repo init` first")
    return root


def _token(value: Any, token_file: Any, log: logging.Logger) -> bytes | None:
    if token_file:
        path = Path(token_file)
        try:
            raw = path.read_bytes()
            mode = path.stat().st_mode
        except OSError as exc:
            raise UsageError("token file", f"{path}: {exc.strerror}") from None
        if mode & 0o077:
            log.warning("token file %s is readable by group or others (mode %o); chmod 600 it", path, mode & 0o777)
        lines = raw.splitlines()
        value = lines[0].strip() if lines else b""
        where = str(path)
    else:
        where = "TOKEN"
    if value is None:
        return None
    token = value.encode() if isinstance(value, str) else bytes(value)
    token = token.strip()
    if not TOKEN_RE.match(token):
        raise UsageError("token", f"{where}: expected at least 16 visible ASCII characters (e.g. the output of "
                                  f"`openssl rand -hex 32`)")
    return token


def _positive_int(value: Any, name: str) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise UsageError("server config", f"{name}: found {value!r}, expected a number of bytes") from None
    if number <= 0:
        raise UsageError("server config", f"{name}: found {number}, expected a positive number of bytes")
    return number


def state() -> ServerState:
    return current_app.extensions["tmplbuild"]


bp = Blueprint("repo", __name__)


def _json_error(status: int, message: str, **extra: Any) -> Response:
    response = jsonify({"error": message, **extra})
    response.status_code = status
    return response


@bp.app_errorhandler(HTTPException)
def _http_error(exc: HTTPException) -> Response | HTTPException:
    if request.path.startswith("/api/") or request.path == "/healthz":
        return _json_error(exc.code or 500, exc.description or exc.name)
    return exc


def _snapshot_or_503() -> Snapshot | Response:
    try:
        return state().index.get()
    except IndexUnavailable as exc:
        return _json_error(503, str(exc))


@bp.get("/")
def page() -> Response | str:
    snap = _snapshot_or_503()
    if isinstance(snap, Response):
        return Response(f"503 Service Unavailable: {snap.get_json()['error']}\n", status=503,
                        mimetype="text/plain")
    if snap.root is not None:
        fingerprints: tuple[str, ...] = snap.root.online.keys  # what keys/ holds: the newest root's online keys
    else:
        try:
            fingerprints = store.read_keys(state().root).fingerprints
        except TmplbuildError:
            fingerprints = ()
    base = request.url_root.rstrip("/")
    templates = sorted(snap.index.templates, key=lambda e: (e.name, e.version, e.arch))
    prefixes = sorted({rec.registry.repository.rsplit("/", 1)[0] for rec in snap.oci.values() if rec.registry})
    return render_template("index.html", snap=snap, index=snap.index, base=base, root=snap.root, oci=snap.oci,
                           oci_prefixes=prefixes,
                           root_path=rootdoc.path(snap.root.version) if snap.root is not None else None,
                           fingerprints=fingerprints, human=human_size, remote=remote_name(snap.index.repo_id),
                           doc_labels=DOCUMENT_LABELS,
                           templates=templates, groups=_by_version(templates))


def _by_version(templates: list) -> list[tuple[str, str, list]]:
    """The page's rows: one group per template name and version, holding that version's architectures (they share
    its directory, and so its SHA256SUMS pair)."""
    groups: list[tuple[str, str, list]] = []
    for e in templates:
        if groups and groups[-1][:2] == (e.name, e.version):
            groups[-1][2].append(e)
        else:
            groups.append((e.name, e.version, [e]))
    return groups


def root_summary(snap: Snapshot) -> dict[str, Any] | None:
    """The newest root as /api/v1/templates shows it (None: a repository without roots)."""
    r = snap.root
    if r is None:
        return None
    return {"version": r.version, "path": rootdoc.path(r.version), "sha256": r.sha256, "expires": r.expires,
            "expired": snap.root_expired,
            "root_keys": {"keys": list(r.root.keys), "threshold": r.root.threshold},
            "online_keys": {"keys": list(r.online.keys), "threshold": r.online.threshold},
            "index_stale": snap.stale is not None}


@bp.get("/api/v1/templates")
def api_templates() -> Response:
    snap = _snapshot_or_503()
    if isinstance(snap, Response):
        return snap
    doc = snap.doc
    body = {"repo_id": doc["repo_id"], "version": doc["version"], "generated": doc["generated"],
            "expires": doc["expires"], "templates": [with_documents(t) for t in doc["templates"]]}
    summary = root_summary(snap)
    if summary is not None:
        body["root"] = summary
    if snap.oci:
        body["oci"] = [oci_summary(key, rec) for key, rec in sorted(snap.oci.items())]
    return jsonify(body)


DOCUMENT_KINDS = {fmt: kind for kind, fmt in KINDS.items()}  # format -> the kind `tmplbuild sbom --format` names
DOCUMENT_LABELS = {idx.SPDX_FORMAT: "SBOM (SPDX 2.3)", idx.CYCLONEDX_FORMAT: "SBOM (CycloneDX 1.5)",
                   idx.PROVENANCE_FORMAT: "SLSA provenance"}


def with_documents(entry: dict[str, Any]) -> dict[str, Any]:
    """An index entry as /api/v1/templates shows it: as signed, plus `documents` (kind -> path) naming its SBOMs
    and provenance among its files, when it has any."""
    docs = {DOCUMENT_KINDS[f["format"]]: f["path"] for f in entry.get("files", []) if f.get("format") in DOCUMENT_KINDS}
    return {**entry, "documents": docs} if docs else entry


def oci_summary(key: tuple[str, str, str], rec: record.Record) -> dict[str, Any]:
    """A pushed image as /api/v1/templates shows it: where it is, by tag and by digest (what the signed index
    binds through the manifest)."""
    assert rec.registry is not None
    name, version, arch = key
    return {"name": name, "version": version, "arch": arch, "repository": rec.registry.repository,
            "tags": list(rec.registry.tags), "digest": rec.image.manifest_digest, "reference": rec.by_digest(),
            "lookaside": [s.path for s in rec.registry.signatures]}


@bp.get("/api/v1/affected")
def api_affected() -> Response:
    """Which template versions carry ?package=NAME (below ?fixed=VERSION; only ?arch=ARCH): the answer `tmplbuild
    affected --json` prints (tmplbuild.sbom.affected). The manifests are read from the repository and checked
    against the verified index, and kept parsed by sha256 for the next query; one that does not match its signed
    sha256 (or cannot be read) makes the answer 503, naming it: never a partial answer. 400 for a bad query."""
    if "package" not in request.args:
        return _json_error(400, "package: missing, expected ?package=NAME (a binary or source package name)")
    try:
        q = affected.query(request.args["package"], request.args.get("fixed"), request.args.get("arch"))
    except UsageError as exc:
        return _json_error(400, str(exc))
    snap = _snapshot_or_503()
    if isinstance(snap, Response):
        return snap
    root = state().root_real
    cache = current_app.extensions.setdefault("tmplbuild.affected", affected.ManifestCache())

    def read(entry):
        with open(os.path.join(root, entry.manifest.path), "rb") as f:
            return f.read(entry.manifest.size + 1)

    try:
        pairs = cache.manifests(snap.index, affected.entries(snap.index, q.arch), read)
        return jsonify(affected.report(snap.index, q, pairs))
    except OSError as exc:
        return _json_error(503, f"manifest: {os.path.relpath(exc.filename or root, root)}: {exc.strerror}")
    except TmplbuildError as exc:
        return _json_error(503, str(exc))


@bp.get("/healthz")
def healthz() -> Response:
    snap = _snapshot_or_503()
    if isinstance(snap, Response):
        return snap
    return jsonify({"status": "ok", "index_version": snap.index.version})


@bp.post("/api/v1/publish")
def publish() -> Response:
    st = state()
    if st.token is None:
        return _json_error(403, "uploads are disabled on this server")
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    # Constant-time comparison; the header is never logged (gunicorn's access log format does not include it).
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode("latin-1", "replace"), st.token):
        response = _json_error(401, "missing or wrong upload token")
        response.headers["WWW-Authenticate"] = 'Bearer realm="tmplbuild"'
        return response
    if request.mimetype != "application/x-tar":
        return _json_error(415, f"Content-Type {request.mimetype or 'missing'}, expected application/x-tar")
    length = request.content_length
    if length is None:
        return _json_error(411, "Content-Length is required")
    if length > st.max_upload:  # before a single byte of the body is read
        return _json_error(413, f"upload of {length} bytes is larger than the server's limit of "
                                f"{st.max_upload} bytes")
    sock = request.environ.get("gunicorn.socket")
    previous = sock.gettimeout() if isinstance(sock, socket.socket) else None
    try:
        if isinstance(sock, socket.socket):
            sock.settimeout(st.idle_timeout)  # a stalled upload must not hold a worker thread forever
        result = upload.receive(st.root, st.index, request.stream, min(length, st.max_upload), current_app.logger)
    except upload.Refused as exc:
        current_app.logger.warning("publish refused (%d): %s", exc.status, exc.message)
        return _json_error(exc.status, exc.message, **exc.extra)
    except (TimeoutError, ClientDisconnected):  # werkzeug reports a read timeout as a disconnect
        return _json_error(400, f"the body ended or stalled (more than {st.idle_timeout:g} s without data) "
                                f"before Content-Length bytes arrived")
    finally:
        if isinstance(sock, socket.socket):
            try:
                sock.settimeout(previous)
            except OSError:
                pass
    return jsonify(result)


@bp.get("/<path:subpath>")
def download(subpath: str) -> Response:
    st = state()
    rel = safety.resolve_download(st.root_real, subpath)
    if rel is None:
        return Response("404 Not Found\n", status=404, mimetype="text/plain")
    # Streamed by the WSGI server's file wrapper (gunicorn: sendfile); ETag, Last-Modified, 304 and 206 Range
    # handling come from werkzeug's conditional responses.
    return send_from_directory(st.root_real, rel, conditional=True, mimetype=content_type(rel))


def content_type(rel: str) -> str:
    name = rel.rsplit("/", 1)[-1]
    if name == "SHA256SUMS":
        return "text/plain"
    for suffix, mimetype in CONTENT_TYPES:
        if name.endswith(suffix):
            return mimetype
    return "application/octet-stream"


def remote_name(repo_id: str) -> str:
    """The name the page suggests for `tmplbuild remote add`: the repository id, made into a remote name
    (lowercase letters, digits, - and _, at most 64), or "templates" when nothing of it is left."""
    name = re.sub(r"[^a-z0-9_-]+", "-", repo_id.lower()).strip("-_")[:64].rstrip("-_")
    return name if REMOTE_NAME.match(name) else "templates"


def human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")
