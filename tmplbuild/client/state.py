"""What the client remembers between runs: per remote, the last index it accepted (version, sha256 of its exact
bytes, repo_id). That is what makes a replayed older index (rollback) or a re-signed different index under
the same version detectable, and what pins a repo_id learned on first use.

One JSON file per remote in `$TMPLBUILD_STATE_DIR`, else `/var/lib/tmplbuild/state` as root, else
`$XDG_STATE_HOME/tmplbuild` (`~/.local/state/tmplbuild`). Written atomically (tmp + fsync + os.replace +
fsync of the directory) and only by a run whose every check passed; a concurrent run that saw a newer index
is never overwritten with an older one (the read-compare-write happens under a lock).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tmplbuild import strictjson
from tmplbuild.client.config import write_atomic
from tmplbuild.client.trust import Seen
from tmplbuild.repo.index import VERSION_MAX, VERSION_MIN
from tmplbuild.files import exclusive_lock
from tmplbuild.errors import LocalIOError

_KEY = re.compile(r"\A[a-z0-9][a-z0-9_-]{0,80}\Z")
LOCK_TIMEOUT = 30.0


def state_dir() -> Path:
    if os.environ.get("TMPLBUILD_STATE_DIR"):
        return Path(os.environ["TMPLBUILD_STATE_DIR"])
    if os.geteuid() == 0:
        return Path("/var/lib/tmplbuild/state")
    return Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state") / "tmplbuild"


def key_for_remote(name: str) -> str:
    return f"remote-{name}"


def key_for_urls(urls: tuple[str, ...]) -> str:
    """One-off `--url` use keeps state too, keyed by its mirror list."""
    return "url-" + hashlib.sha256("\n".join(urls).encode()).hexdigest()[:24]


def _path(key: str) -> Path:
    if not _KEY.match(key):
        raise ValueError(f"bad state key {key!r}")
    return state_dir() / f"{key}.json"


def load(key: str) -> Seen | None:
    """The last index accepted for `key`, or None on first use. Raises LocalIOError for an unreadable or
    malformed state file: ignoring it would silently switch rollback protection off. Read as strictly as a
    signed document (tmplbuild.strictjson: no duplicate keys, NaN or deep nesting), the version within the
    index's range."""
    path = _path(key)
    reason = ""
    try:
        doc = strictjson.loads(path.read_bytes(), what=str(path), max_depth=4)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise LocalIOError("state", f"cannot read {path}: {exc.strerror}") from None
    except ValueError as exc:
        doc, reason = None, f" ({str(exc).removeprefix(f'{path}: ')})"
    if (not isinstance(doc, dict) or not isinstance(doc.get("repo_id"), str)
            or type(doc.get("version")) is not int or not VERSION_MIN <= doc["version"] <= VERSION_MAX
            or not isinstance(doc.get("sha256"), str) or not re.fullmatch(r"[0-9a-f]{64}", doc["sha256"])):
        raise LocalIOError("state", f"{path}: malformed{reason}, expected {{repo_id, version, sha256}}; remove it "
                                    "only if you accept that rollback protection starts again from the next index")
    return Seen(repo_id=doc["repo_id"], version=doc["version"], sha256=doc["sha256"])


@contextmanager
def _locked(directory: Path) -> Iterator[None]:
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o755 if os.geteuid() == 0 else 0o700)
        fd = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as exc:
        raise LocalIOError("state", f"{directory}: {exc.strerror}") from None
    try:
        with exclusive_lock(fd, LOCK_TIMEOUT, "lock", f"{directory / '.lock'}: held by another tmplbuild run"):
            yield
    finally:
        os.close(fd)


def record(key: str, seen: Seen, remote: str) -> None:
    """Remember `seen` as the last accepted index for `key`. Call only after every check of the run passed.
    Keeps what is there when a concurrent run already recorded a newer version (or the same version: it
    passed the same checks). Raises LocalIOError; ValueError for a version outside the index's range (the
    index parse refuses those, so this is a bug guard, never a state file nothing can read back)."""
    if type(seen.version) is not int or not VERSION_MIN <= seen.version <= VERSION_MAX:
        raise ValueError(f"state: index version {seen.version!r} outside {VERSION_MIN}..{VERSION_MAX}")
    path = _path(key)
    with _locked(path.parent):
        current = load(key)
        if current is not None and current.repo_id == seen.repo_id and current.version >= seen.version:
            return
        doc = {"remote": remote, "repo_id": seen.repo_id, "version": seen.version, "sha256": seen.sha256,
               "accepted": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        write_atomic(path, (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode())
