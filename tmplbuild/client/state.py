"""What the client remembers between runs: per repository, the last index it accepted (version, sha256 of its exact
bytes, repo_id). That is what makes a replayed older index (rollback) or a re-signed different index under
the same version detectable, and what pins a repo_id learned on first use. For a remote that pins a root of
trust, also the online keys of the root that index was accepted under (`online`), and the newest trusted root
itself, as its exact bytes, in `<key>.root.json` beside the JSON file: the next run starts its walk from it
without checking it again (it was checked when it was stored), and it is never replaced by a lower version.

It is kept per repository identity, not per URL typed (`key_for_identity`): the pinned root keys, else the pinned
index key fingerprints, so every URL, mirror and remote that pins the same repository shares what any of them
learned (a rotation followed through one URL is not undone by another serving the old chain). One JSON file per
identity in `$TMPLBUILD_STATE_DIR`, else `/var/lib/tmplbuild/state` as root, else
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
from typing import TYPE_CHECKING

from tmplbuild import strictjson
from tmplbuild.client.config import write_atomic
from tmplbuild.client.trust import Seen
from tmplbuild.repo.index import VERSION_MAX, VERSION_MIN
from tmplbuild.files import exclusive_lock
from tmplbuild.errors import AuthenticityError, LocalIOError

if TYPE_CHECKING:
    from tmplbuild.repo.root import Root

_KEY = re.compile(r"\A[a-z0-9][a-z0-9_-]{0,80}\Z")
LOCK_TIMEOUT = 30.0


def state_dir() -> Path:
    if os.environ.get("TMPLBUILD_STATE_DIR"):
        return Path(os.environ["TMPLBUILD_STATE_DIR"])
    if os.geteuid() == 0:
        return Path("/var/lib/tmplbuild/state")
    return Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state") / "tmplbuild"


def key_for_identity(pins: tuple[str, ...], *, root: bool, repo_id: str | None = None) -> str:
    """The state key of a repository: its pinned root keys (`root`), else its pinned index key fingerprints,
    sorted and normalised. The repo_id learned on first use is recorded under it and pinned; a source that pins a
    repo_id other than the one recorded there (another repository signed by the same keys) gets a key of its own.
    Raises LocalIOError (an unreadable state file)."""
    from tmplbuild.sign.keys import normalise_fingerprint

    text = ("root " if root else "key ") + " ".join(sorted({normalise_fingerprint(f) for f in pins}))
    base = "id-" + hashlib.sha256(text.encode()).hexdigest()[:24]
    if repo_id is None:
        return base
    seen = load(base)
    if seen is None or seen.repo_id == repo_id:
        return base
    return "id-" + hashlib.sha256(f"{text}\nrepo {repo_id}".encode()).hexdigest()[:24]


def key_for_remote(name: str) -> str:
    """Where a remote's state was kept before it was keyed by identity: read once, when the identity has none."""
    return f"remote-{name}"


def key_for_urls(urls: tuple[str, ...], root_keys: tuple[str, ...] = ()) -> str:
    """Where one-off `--url` use kept its state before it was keyed by identity (by the mirror list and the pinned
    root keys): read once, when the identity has none."""
    text = "\n".join(urls) + ("\nroot " + " ".join(sorted(root_keys)) if root_keys else "")
    return "url-" + hashlib.sha256(text.encode()).hexdigest()[:24]


def _path(key: str) -> Path:
    if not _KEY.match(key):
        raise ValueError(f"bad state key {key!r}")
    return state_dir() / f"{key}.json"


def _root_path(key: str) -> Path:
    return _path(key).with_suffix(".root.json")


def load(key: str, fallback: str | None = None) -> Seen | None:
    """The last index accepted for `key` (else for `fallback`, the key of an older layout), or None on first use.
    Raises LocalIOError for an unreadable or malformed state file: ignoring it would silently switch rollback
    protection off. Read as strictly as a signed document (tmplbuild.strictjson: no duplicate keys, NaN or deep
    nesting), the version within the index's range."""
    got = load_record(key, fallback)
    return got[0] if got else None


def load_record(key: str, fallback: str | None = None) -> tuple[Seen, tuple[str, ...] | None] | None:
    """`load`, with the online keys of the root the index was accepted under (None: accepted under a pinned index
    key, or recorded before roots). Raises LocalIOError as `load`."""
    got = _load_record(key)
    return got if got is not None or fallback is None else _load_record(fallback)


def _load_record(key: str) -> tuple[Seen, tuple[str, ...] | None] | None:
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
            or not isinstance(doc.get("sha256"), str) or not re.fullmatch(r"[0-9a-f]{64}", doc["sha256"])
            or ("online" in doc and (not isinstance(doc["online"], list) or not doc["online"]
                                     or not all(isinstance(f, str) and re.fullmatch(r"[0-9A-F]{40}", f)
                                                for f in doc["online"])))):
        raise LocalIOError("state", f"{path}: malformed{reason}, expected {{repo_id, version, sha256}} (and "
                                    "optionally online: a list of fingerprints); remove it only if you accept that "
                                    "rollback protection starts again from the next index")
    online = tuple(doc["online"]) if "online" in doc else None
    return Seen(repo_id=doc["repo_id"], version=doc["version"], sha256=doc["sha256"]), online


def load_root(key: str, known: Root | None = None, fallback: str | None = None) -> Root | None:
    """The newest root trusted for `key` (else for `fallback`, the key of an older layout; stored by an earlier run
    whose every check passed), or None. `known`:
    a root already parsed in this run, returned as it is when the file holds its exact bytes (no second parse).
    Raises LocalIOError for an unreadable or malformed one: starting over from the pins would silently undo a
    rotation the client has already followed."""
    path = _root_path(key)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None if fallback is None else load_root(fallback, known)
    except OSError as exc:
        raise LocalIOError("state", f"cannot read {path}: {exc.strerror}") from None
    if known is not None and data == known.raw:
        return known
    from tmplbuild.repo import root as rootdoc  # here, not at import: the legacy path overlaps loading gnupg

    try:
        return rootdoc.parse(data)
    except AuthenticityError as exc:
        raise LocalIOError("state", f"{path}: malformed ({exc.message}), expected the root document this client "
                                    "last trusted; remove it only if you accept that trust starts again from the "
                                    "pinned root keys") from None


def forget_root(key: str) -> None:
    """Drop the root stored for `key` (a remote added anew: its own pins rule). Raises LocalIOError."""
    path = _root_path(key)
    if not path.exists():
        return
    with _locked(path.parent):
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            raise LocalIOError("state", f"cannot remove {path}: {exc.strerror}") from None


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


def rotated(before: tuple[str, ...] | None, now: tuple[str, ...]) -> bool:
    """The online keys changed between the root an index was accepted under and the trusted root (TUF 5.3.11):
    the index version bar is then forgotten. Unknown before (None: an index key pin, or a state from before
    roots) is not a change: the bar is kept."""
    return before is not None and set(before) != set(now)


def record_root(key: str, root: Root) -> None:
    """Store `root` as the newest trusted root for `key` as soon as the chain proved it (TUF 5.3.8: a root is
    persisted when verified, before the index is looked at), so that a run whose index then fails still
    leaves the client on the new root: a mirror that later hides it cannot bring the dropped keys back. Never
    replaces a higher version. The index record (and its online keys) is untouched. Raises LocalIOError."""
    with _locked(_path(key).parent):
        _keep_newest_root(key, root)


def _keep_newest_root(key: str, root: Root) -> bool:
    """Under the state lock: store `root` unless the stored one is at least as new. False when a newer root is
    stored (a concurrent run trusted it)."""
    stored = load_root(key, root)
    if stored is None or stored.version < root.version:
        write_atomic(_root_path(key), root.raw)
    return stored is None or stored.version <= root.version


def record(key: str, seen: Seen, remote: str, *, root: Root | None = None) -> None:
    """Remember `seen` as the last accepted index for `key`, and, for a root-pinned source, `root`: the newest
    trusted root the index was accepted under (its online keys are recorded with the index). Call only after
    every check of the run passed.
    Keeps what is there when a concurrent run already recorded a newer version (or the same version: it passed
    the same checks), unless the online keys changed since (then the bar was rightly forgotten: fast-forward
    recovery), and keeps both when a concurrent run already stored a newer root. A root is never replaced by
    a lower version. Raises LocalIOError; ValueError for a version outside the index's range (the index parse
    refuses those, so this is a bug guard, never a state file nothing can read back)."""
    if type(seen.version) is not int or not VERSION_MIN <= seen.version <= VERSION_MAX:
        raise ValueError(f"state: index version {seen.version!r} outside {VERSION_MIN}..{VERSION_MAX}")
    path = _path(key)
    with _locked(path.parent):
        got = load_record(key)
        current, online = got if got else (None, None)
        if root is not None and not _keep_newest_root(key, root):
            return  # a concurrent run trusted a newer root: its record stands
        changed = root is not None and rotated(online, root.online.keys)
        if current is not None and current.repo_id == seen.repo_id and not changed:
            if current.version > seen.version:
                return
            if current.version == seen.version and (root is None or online is not None):
                return  # the same bytes (the rollback check saw to it), the online keys already recorded
        doc = {"remote": remote, "repo_id": seen.repo_id, "version": seen.version, "sha256": seen.sha256,
               "accepted": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        if root is not None:
            doc["online"] = list(root.online.keys)
        write_atomic(path, (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode())


# -- where fetched files came from ---------------------------------------------------------------------------------

ORIGINS = "origins.json"
MAX_ORIGINS = 1000  # the newest kept; entries whose file is gone are dropped at every write


def record_origin(path: Path, remote: str, sha256: str) -> None:
    """Remember that `path` was fetched from the configured remote `remote` (and its signed sha256), so that
    `tmplbuild verify FILE` checks it against that remote without being told. Raises LocalIOError."""
    directory = state_dir()
    with _locked(directory):
        origins = _load_origins(directory / ORIGINS)
        origins.pop(str(path), None)
        origins[str(path)] = {"remote": remote, "sha256": sha256}
        kept = {p: o for p, o in origins.items() if os.path.lexists(p)}
        kept = dict(list(kept.items())[-MAX_ORIGINS:])
        write_atomic(directory / ORIGINS, (json.dumps(kept, indent=2) + "\n").encode())


def origin_of(path: Path) -> str | None:
    """The remote `path` was fetched from, as recorded by record_origin, or None."""
    got = _load_origins(state_dir() / ORIGINS).get(str(path))
    return got.get("remote") if isinstance(got, dict) and isinstance(got.get("remote"), str) else None


def _load_origins(path: Path) -> dict[str, dict]:
    try:
        doc = json.loads(path.read_bytes())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):
        return {}  # a damaged record only costs the convenience: verify then asks for --remote
    return doc if isinstance(doc, dict) else {}
