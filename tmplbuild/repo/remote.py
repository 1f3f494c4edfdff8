"""`tmplbuild publish --to URL`: publish to a repository server.

The publisher does everything a local publish does, in a private staging directory: it fetches the server's
current index and verifies it with pinned keys (never keys from the server), signs the new files and the next
index (version + 1), verifies every signature, and uploads the lot as one tar. The server checks it all again
against its own pinned keys before anything goes live; a 409 (another publisher got there first) means
fetch, rebuild and retry."""
from __future__ import annotations

import shutil
import tarfile
import tempfile
from pathlib import Path

import requests

from tmplbuild.errors import AuthenticityError, TransportError, UsageError
from tmplbuild.repo import index as idx
from tmplbuild.repo.publish import Published, _add, load_artifact, stage_additions
from tmplbuild.sign import Signer, Verifier

INDEX_CAP = 16 << 20
TIMEOUT = (10, 300)
RETRIES = 3


def read_token(path: Path) -> str:
    try:
        token = path.read_text().strip()
    except OSError as exc:
        raise UsageError("token", f"{path}: {exc.strerror}") from None
    if not token or any(c.isspace() for c in token):
        raise UsageError("token", f"{path}: expected one token on one line")
    return token


def fetch_verified_index(session: requests.Session, base: str, verifier: Verifier) -> idx.Index:
    """A server's current index, after its signature over the exact bytes verified with pinned keys. Raises
    TransportError, AuthenticityError."""
    data = get_capped(session, f"{base}/index.json")
    verifier.verify(data, get_capped(session, f"{base}/index.json.asc"))
    return idx.parse(data)


def get_capped(session: requests.Session, url: str) -> bytes:
    try:
        with session.get(url, timeout=TIMEOUT, stream=True, allow_redirects=False) as resp:
            if resp.status_code != 200:
                raise TransportError("fetch", f"{url}: HTTP {resp.status_code}, expected 200")
            data = bytearray()
            for chunk in resp.iter_content(1 << 16):
                data += chunk
                if len(data) > INDEX_CAP:
                    raise TransportError("download size", f"{url}: more than {INDEX_CAP} bytes")
            return bytes(data)
    except requests.RequestException as exc:
        raise TransportError("fetch", f"{url}: {type(exc).__name__}: {exc}") from None


def publish_remote(url: str, paths: list[Path], signer: Signer, pinned_keys: bytes, pinned: tuple[str, ...],
                   token: str, expires_in: int) -> Published:
    """Raises UsageError (artifacts, token refused), AuthenticityError (the server's index, an artifact, or
    the server's verdict on the upload), TransportError (HTTP), LocalIOError."""
    artifacts = [load_artifact(p) for p in paths]
    base = url.rstrip("/")
    session = requests.Session()
    with Verifier(pinned_keys, pinned) as verifier:
        for attempt in range(1, RETRIES + 1):
            current = fetch_verified_index(session, base, verifier)
            staging = Path(tempfile.mkdtemp(prefix="tmplbuild-upload-"))
            try:
                added, unchanged = stage_additions(
                    current, artifacts, lambda art, neighbours: _add(staging, art, signer, verifier, neighbours))
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
                    status, reply = _upload(session, f"{base}/api/v1/publish", body, token)
                finally:
                    body.unlink(missing_ok=True)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
            if status == 200:
                return Published(new, added, unchanged)
            if status == 409 and attempt < RETRIES:
                continue  # another publisher won the race: start again from its index
            raise _refusal(status, reply)
    raise AssertionError("unreachable")


def _tar(staging: Path, dest: Path) -> None:
    with tarfile.open(dest, "w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(p for p in staging.rglob("*") if p.is_file()):
            info = tarfile.TarInfo(str(path.relative_to(staging)))
            info.size = path.stat().st_size
            info.mode = 0o644
            with open(path, "rb") as f:
                tar.addfile(info, f)


def _upload(session: requests.Session, url: str, body: Path, token: str) -> tuple[int, str]:
    try:
        with open(body, "rb") as f:
            resp = session.post(url, data=f, timeout=TIMEOUT, allow_redirects=False, headers={
                "Authorization": f"Bearer {token}", "Content-Type": "application/x-tar",
                "Content-Length": str(body.stat().st_size)})
    except requests.RequestException as exc:
        raise TransportError("upload", f"{url}: {type(exc).__name__}: {exc}") from None
    try:
        reply = resp.json().get("error", "") if resp.status_code != 200 else ""
    except ValueError:
        reply = resp.text[:200]
    return resp.status_code, reply


def _refusal(status: int, reply: str) -> Exception:
    what = f"the server answered {status}" + (f": {reply}" if reply else "")
    if status in (401, 403):
        return UsageError("upload", what)
    if status in (400, 422):
        return AuthenticityError("upload", what)
    return TransportError("upload", what)
