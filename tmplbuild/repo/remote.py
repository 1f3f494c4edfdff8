"""`tmplbuild publish --to URL`: publish to a repository server.

The publisher does everything a local publish does, in a private staging directory: it fetches the server's
current index and verifies it with pinned keys (never keys from the server), signs the new files and the next
index (version + 1), verifies every signature, and uploads the lot as one tar. The server checks it all again
against its own pinned keys before anything goes live; a 409 (another publisher got there first) means
fetch, rebuild, re-sign and retry, after a jittered exponential backoff, until the publish deadline
(retry_conflicts). The publisher pins its own key (and any --repo-key) for the server's current index, also in a
repository with a root of trust: after a rotation, building on an index another key signed is a step a person
takes explicitly. `publish_root_remote` uploads a new root (`tmplbuild root publish`)."""
from __future__ import annotations

import json
import os
import random
import shutil
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from tmplbuild.errors import (AuthenticityError, FreshnessError, PublishConflictError, SignatureError, TransportError,
                              UsageError)
from tmplbuild.repo import deltas
from tmplbuild.repo import index as idx
from tmplbuild.oci.publisher import Destination as OciDestination
from tmplbuild.oci.publisher import image_of
from tmplbuild.repo.publish import Artifact, Published, Pushed, _add, load_artifact, push_image, stage_additions
from tmplbuild.sign import Signer, Verifier
from tmplbuild.transport import Transport, parse_seconds

CONFLICT_DEADLINE = 120.0  # seconds a publisher keeps retrying 409 conflicts (TMPLBUILD_PUBLISH_DEADLINE)
BACKOFF_FIRST = 0.25  # seconds: the first backoff's ceiling, doubled per conflict ...
BACKOFF_MAX = 8.0  # ... up to this; the actual sleep is uniformly random below the ceiling ("full jitter")
ENV_CONFLICT_DEADLINE = "TMPLBUILD_PUBLISH_DEADLINE"
RETRIES = 3  # kept for callers of the old loop; conflicts now retry until CONFLICT_DEADLINE (retry_conflicts)
T = TypeVar("T")


class Conflict(Exception):
    """The server answered 409: another publisher's index went live first."""

    def __init__(self, reply: str) -> None:
        super().__init__(reply)
        self.reply = reply


def conflict_deadline() -> float:
    value = os.environ.get(ENV_CONFLICT_DEADLINE, "").strip()
    return parse_seconds(value, ENV_CONFLICT_DEADLINE) if value else CONFLICT_DEADLINE


def retry_conflicts(attempt: Callable[[int], T], deadline: float | None = None,
                    sleep: Callable[[float], None] = time.sleep) -> T:
    """`attempt(n)` (n = 1, 2, ...) until it returns. Each attempt reads the server's current index, builds
    and signs its successor and uploads it; when it raises Conflict (409: another publisher's index went live
    first), the next one starts over after a jittered exponential backoff (full jitter: uniform in [0, ceiling),
    the ceiling doubling from BACKOFF_FIRST up to BACKOFF_MAX), for up to `deadline` seconds (default
    CONFLICT_DEADLINE or $TMPLBUILD_PUBLISH_DEADLINE). Conflicts that outlast it raise PublishConflictError
    (exit 7, as a local publish that cannot get the repository lock); any other failure is raised at once."""
    limit = conflict_deadline() if deadline is None else deadline
    start = time.monotonic()
    n = 0
    while True:
        n += 1
        try:
            return attempt(n)
        except Conflict as exc:
            elapsed = time.monotonic() - start
            ceiling = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (n - 1))
            pause = random.uniform(0, ceiling)
            if elapsed + pause >= limit:
                raise PublishConflictError("publish conflict", (
                    f"{n} attempts in {elapsed:.0f} s each lost the race to another publisher (the server answered "
                    f"409: {exc.reply or 'version conflict'}); gave up after the {limit:g} s publish deadline "
                    f"({ENV_CONFLICT_DEADLINE} changes it): nothing of this publish went live")) from None
            sleep(pause)


def read_token(path: Path) -> str:
    try:
        token = path.read_text().strip()
    except OSError as exc:
        raise UsageError("token", f"{path}: {exc.strerror}") from None
    if not token or any(c.isspace() for c in token):
        raise UsageError("token", f"{path}: expected one token on one line")
    return token


def _transport(session) -> Transport:
    """The shared transport; a caller passing anything else (an older caller's HTTP session) gets a fresh
    Transport instead."""
    return session if isinstance(session, Transport) else Transport()


def fetch_verified_index(session: Transport, base: str, verifier: Verifier) -> idx.Index:
    """A server's current index, after its signature over the exact bytes verified with pinned keys. Raises
    TransportError, AuthenticityError."""
    transport = _transport(session)
    for attempt in (1, 2, 3):
        data = transport.get_bytes(f"{base}/index.json", idx.INDEX_CAP, "index.json", document=True)
        sig = transport.get_bytes(f"{base}/index.json.asc", idx.SIGNATURE_CAP, "index.json.asc", document=True)
        try:
            verifier.verify(data, sig)
            break
        except SignatureError:
            # The pair cannot be swapped in one step: a read racing another publisher's renames can see the
            # new index with the old signature for a moment. Read it again before calling it a failure.
            if attempt == 3:
                raise
            time.sleep(0.1 * attempt)
    return idx.parse(data)


def fetch_pinned_index(session: Transport, base: str, verifier: Verifier, pinned: tuple[str, ...]) -> idx.Index:
    """fetch_verified_index for a publisher, who pins its own key (and any --repo-key) for the server's current
    index: the explicit review step after a root rotation. A signature by another key is refused with a line
    saying so. Raises TransportError, AuthenticityError (SignatureError)."""
    try:
        return fetch_verified_index(session, base, verifier)
    except SignatureError as exc:
        raise SignatureError(exc.check, (
            f"the server's current index: {exc.message}; a publisher builds only on an index signed by a key it "
            f"pins (its own, {', '.join(pinned)}, and any --repo-key): if another key signed it (another "
            f"maintainer, or a key a new root dropped), review that index and pass its key with --repo-key, or "
            f"re-sign it on the server's directory (`tmplbuild repo resign DIR --carry-over`)")) from None


def publish_root_remote(url: str, data: bytes, sig: bytes, token: str) -> int:
    """Upload a root (its document and concatenated signatures, signed offline by its root key holders) to a
    repository server, which checks it against its newest root (TUF's successor rule) and installs it. Returns
    the root version now in place. Raises UsageError (a document that is no root; token refused),
    AuthenticityError (the server's verdict: signatures, schema, expired), FreshnessError (409: not the next
    version, e.g. a rollback or a root already there), TransportError (HTTP)."""
    from tmplbuild.repo import root as rootdoc

    try:
        version = rootdoc.parse(data).version
    except AuthenticityError as exc:
        raise UsageError("root", f"not a root document: {exc.message}") from None
    rootdoc.split_signatures(sig, f"{rootdoc.path(version)}.asc")  # SignatureError for garbage, before sending
    base = url.rstrip("/")
    staging = Path(tempfile.mkdtemp(prefix="tmplbuild-root-"))
    body = staging.parent / f"{staging.name}.tar"
    try:
        (staging / rootdoc.DIRECTORY).mkdir()
        (staging / rootdoc.path(version)).write_bytes(data)
        (staging / (rootdoc.path(version) + ".asc")).write_bytes(sig)
        _tar(staging, body)
        with Transport() as transport:
            status, reply = _upload(transport, f"{base}/api/v1/publish", body, token)
    finally:
        body.unlink(missing_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
    if status == 200:
        return version
    if status == 409:
        raise FreshnessError("upload", f"the server answered 409: {reply or 'root version conflict'}")
    raise _refusal(status, reply)


def get_capped(session: Transport, url: str) -> bytes:
    """At most idx.INDEX_CAP bytes of `url` (an index or manifest), within a small document's deadline."""
    return _transport(session).get_bytes(url, idx.INDEX_CAP, url.rsplit("/", 1)[-1], document=True)


def publish_remote(url: str, paths: list[Path], signer: Signer, pinned_keys: bytes, pinned: tuple[str, ...],
                   token: str, expires_in: int, oci: OciDestination | None = None,
                   delta_count: int | None = None) -> Published:
    """Deltas from the last `delta_count` earlier versions (tmplbuild.repo.deltas) are made from their tar.zst
    downloaded from the server and checked against its verified index. With `oci`, each new template's image is
    pushed and signed first (once, whatever the retries), and its lookaside signatures go into the upload. Raises
    UsageError (artifacts, token refused), AuthenticityError (the server's index, an artifact, or the server's
    verdict on the upload), PublishConflictError (409 conflicts past the publish deadline), TransportError (HTTP,
    the registry), LocalIOError."""
    artifacts = [load_artifact(p) for p in paths]
    delta_count = deltas.DEFAULT_COUNT if delta_count is None else delta_count
    if oci is not None:
        for art in artifacts:
            image_of(art.manifest, art.manifest_path)  # every one has an image, before any push
    base = url.rstrip("/")
    pushed: dict[tuple[str, str, str], Pushed | None] = {}

    def add(staging: Path, verifier: Verifier, art: Artifact, neighbours: list[idx.Entry],
            current: idx.Index, transport: Transport) -> idx.Entry:
        if art.key not in pushed:
            pushed[art.key] = push_image(art, oci, signer)

        def base_file(ref: idx.FileRef) -> Path:
            # The base's tar.zst from the server, capped at its signed size and checked against its signed hashes.
            from tmplbuild.client.download import Progress, install

            where = staging.parent / f"{staging.name}-bases"
            where.mkdir(exist_ok=True)
            name = ref.path.rsplit("/", 1)[-1]
            install(transport, f"{base}/{ref.path}", ref, where, name, Progress(name, ref.size, enabled=False))
            return where / name

        return _add(staging, art, signer, verifier, neighbours, pushed[art.key],
                    deltas.bases(current, *art.key, art.manifest.created, delta_count), base_file)

    with Transport() as transport, Verifier(pinned_keys, pinned) as verifier:
        def attempt(n: int) -> Published:
            current = fetch_pinned_index(transport, base, verifier, pinned)
            staging = Path(tempfile.mkdtemp(prefix="tmplbuild-upload-"))
            try:
                added, unchanged = stage_additions(
                    current, artifacts, lambda art, neighbours: add(staging, verifier, art, neighbours, current,
                                                                    transport))
                if not added:
                    return Published(current, [], unchanged)
                new = current.successor(tuple(current.templates) + tuple(added), expires_in)
                new_bytes = new.to_bytes()
                sig = signer.sign(new_bytes, armored=True)
                verifier.verify(new_bytes, sig)
                (staging / "index.json").write_bytes(new_bytes)
                (staging / "index.json.asc").write_bytes(sig)
                body = staging.parent / f"{staging.name}.tar"
                _tar(staging, body)
                try:
                    status, reply = _upload(transport, f"{base}/api/v1/publish", body, token)
                finally:
                    body.unlink(missing_ok=True)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
                shutil.rmtree(staging.parent / f"{staging.name}-bases", ignore_errors=True)
            if status == 200:
                return Published(new, added, unchanged)
            raise _refusal(status, reply)

        return retry_conflicts(attempt)


def _tar(staging: Path, dest: Path) -> None:
    with tarfile.open(dest, "w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(p for p in staging.rglob("*") if p.is_file()):
            info = tarfile.TarInfo(str(path.relative_to(staging)))
            info.size = path.stat().st_size
            info.mode = 0o644
            with open(path, "rb") as f:
                tar.addfile(info, f)


def _upload(session: Transport, url: str, body: Path, token: str) -> tuple[int, str]:
    """POST the tar `body`; (status, the server's error text). The upload's deadline is the transport's: its
    size at the minimum rate plus the fixed allowances. Raises TransportError."""
    status, data = _transport(session).post_file(url, body, {
        "Authorization": f"Bearer {token}", "Content-Type": "application/x-tar"})
    if status == 200:
        return status, ""
    try:
        reply = json.loads(data).get("error", "")
    except (ValueError, AttributeError):
        reply = data[:200].decode("utf-8", errors="replace")
    return status, str(reply)


def _refusal(status: int, reply: str) -> Exception:
    """The error for a non-200 answer; a 409 is a Conflict, which retry_conflicts retries."""
    what = f"the server answered {status}" + (f": {reply}" if reply else "")
    if status == 409:
        return Conflict(reply)
    if status in (401, 403):
        return UsageError("upload", what)
    if status in (400, 422):
        return AuthenticityError("upload", what)
    return TransportError("upload", what)
