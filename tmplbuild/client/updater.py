"""The client's update layer, between the verbs (tmplbuild.client.commands: argparse and output) and the pure
trust decisions (tmplbuild.client.trust), as python-tuf's ngclient separates its updater, trusted set and
fetcher:

- `Source`: where a run gets its index from and what must have signed it (a configured remote or a one-off URL):
  a pinned index key, or a pinned root of trust (root key fingerprints, optionally a root document);
- `Updater`: one run against one source. It owns the pinned verifier and the HTTP transport, walks the mirrors
  in order, keeps the rollback bar (the state's last index, raised by every index verified in this run), and
  records the accepted index in the client state only once the whole run succeeded (`commit`).

A root source, on each mirror (TUF's client workflow, 5.3): the trusted root is the one the state keeps (checked
when it was stored, not again), else the admin's out-of-band root document (trusted as given), else the anchor:
the first root of the mirror signed by a threshold of pinned root keys (tmplbuild.repo.root.anchor_and_walk).
From it the chain is walked (root N+1, N+2, ... until the mirror answers 404: one extra GET per run once
nothing changed), the newest root must not be expired, and the index must be signed by a threshold of its
online keys. A root a mirror proved is trusted for the rest of the run (the bar rises, as the index's does), and
stored at once (TUF 5.3.8), even when the index then fails: the client stays on it. When the newest root's
online keys differ from those the last index was accepted under, the index version bar is forgotten, the repo_id
pin kept (TUF 5.3.11: recovery from a stolen online key that signed a huge version).

Failures are typed (tmplbuild.errors); nothing here branches on a message's text.
"""
from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from tmplbuild.client import state, trust
from tmplbuild.errors import (AuthenticityError, FreshnessError, SignatureError, TransportError, UsageError)

if TYPE_CHECKING:
    from tmplbuild.repo.root import Root, RootVerifier
    from tmplbuild.sign.verify import Verifier

T = TypeVar("T")


@dataclass(frozen=True)
class Source:
    """Where a run gets its index from and what must have signed it."""

    label: str  # "remote NAME" or the URL, for messages and the state file
    urls: tuple[str, ...]
    keys: bytes  # the pinned index key material (b"" for a root source)
    fingerprints: tuple[str, ...]  # its pinned fingerprints (() for a root source)
    repo_id: str | None
    state_key: str  # the repository's identity (state.key_for_identity): shared by every URL and remote pinning it
    root_keys: tuple[str, ...] = ()  # pinned root key fingerprints: a root source
    root: Root | None = None  # the admin's out-of-band root document, trusted as given
    legacy_key: str | None = None  # where this source's state was kept before identity keys: read when it has none
    remote: str | None = None  # the configured remote's name (None: --url)

    @property
    def pins_root(self) -> bool:
        return bool(self.root_keys)


def remote_source(name: str | None) -> Source:
    """The configured remote `name` (or the only one configured). Raises UsageError."""
    from tmplbuild.client import config

    remote = config.get(name)
    legacy = state.key_for_remote(remote.name)
    if remote.pins_root:
        return Source(label=f"remote {remote.name}", remote=remote.name, urls=remote.urls, keys=b"", fingerprints=(),
                      repo_id=remote.repo_id,
                      state_key=state.key_for_identity(remote.root_keys, root=True, repo_id=remote.repo_id),
                      root_keys=remote.root_keys, root=remote.root_doc(), legacy_key=legacy)
    return Source(label=f"remote {remote.name}", remote=remote.name, urls=remote.urls, keys=remote.key_material(),
                  fingerprints=remote.fingerprints, repo_id=remote.repo_id,
                  state_key=state.key_for_identity(remote.fingerprints, root=False, repo_id=remote.repo_id),
                  legacy_key=legacy)


def url_source(urls: list[str], keys: bytes, fingerprints: tuple[str, ...], repo_id: str | None) -> Source:
    """A one-off repository: its mirror URLs with the pinned key material. Raises UsageError."""
    from tmplbuild.client import config

    checked = config.check_urls(urls)
    repo_id = config.check_repo_id(repo_id) if repo_id else None
    return Source(label=checked[0], urls=checked, keys=keys, fingerprints=fingerprints, repo_id=repo_id,
                  state_key=state.key_for_identity(fingerprints, root=False, repo_id=repo_id),
                  legacy_key=state.key_for_urls(checked))


def url_root_source(urls: list[str], root_keys: tuple[str, ...], repo_id: str | None) -> Source:
    """A one-off repository pinned by its root keys. Its state (the trusted root, the last index) is the
    repository's: keyed by the pins (state.key_for_identity), whatever URL reaches it. Raises UsageError."""
    from tmplbuild.client import config
    from tmplbuild.sign.keys import normalise_fingerprint

    checked = config.check_urls(urls)
    pins = tuple(dict.fromkeys(normalise_fingerprint(f, "root key") for f in root_keys))
    repo_id = config.check_repo_id(repo_id) if repo_id else None
    return Source(label=checked[0], urls=checked, keys=b"", fingerprints=(), repo_id=repo_id,
                  state_key=state.key_for_identity(pins, root=True, repo_id=repo_id), root_keys=pins,
                  legacy_key=state.key_for_urls(checked, pins))


# Least to most severe: when every mirror failed, the most severe failure is the one reported.
_SEVERITY = (TransportError, UsageError, FreshnessError, AuthenticityError)


def severity(exc: Exception) -> int:
    return max(rank for rank, kind in enumerate(_SEVERITY) if isinstance(exc, kind))


class Updater:
    """One run against one source. Use as a context manager."""

    def __init__(self, source: Source) -> None:
        self.source = source
        got = state.load_record(source.state_key, source.legacy_key)
        self.last, self.last_online = got if got else (None, None)
        self.warnings: list[str] = []
        self.root: Root | None = None  # root source: the newest root trusted so far in this run
        self.index_root: Root | None = None  # root source: the root the last index accepted was checked under
        self._root_verifiers: dict[str, RootVerifier] = {}
        # The pinned verifier is made (gpg imports and lists the keys) on another thread while this one loads the
        # HTTP stack and fetches the first index: the two overlap instead of adding up. Its result, or its error,
        # is taken before the first signature is checked, so nothing is checked any later or any less. For a root
        # source the keys come from the root, which may come from the mirror: the root already trusted (stored,
        # or the admin's out-of-band document) is read, and its verifier made, on that thread; usually it is
        # still the newest. Both are taken by `trusted_root` before any root or index is checked (a malformed
        # stored root raises there).
        self._verifier: Verifier | RootVerifier | BaseException | None = None
        self._loading: BaseException | None = None
        self._making: threading.Thread | None = threading.Thread(
            target=self._load_trusted_root if source.pins_root else self._make_verifier, daemon=True)
        self._making.start()
        try:
            from tmplbuild.client.download import Transport

            self.transport = Transport()
        except BaseException:
            self._close_verifier()
            raise

    def _load_trusted_root(self) -> None:
        from tmplbuild.repo.root import RootVerifier

        try:
            stored = state.load_root(self.source.state_key, fallback=self.source.legacy_key)
        except BaseException as exc:  # handed to the main thread by `trusted_root`
            self._loading = exc
            return
        given = self.source.root
        self.root = stored
        if given is not None and (stored is None or (given.repo_id == stored.repo_id
                                                     and given.version > stored.version)):
            self.root = given
        if self.root is not None:
            try:
                self._verifier = RootVerifier(self.root)
            except BaseException as exc:  # raised by `_root_verifier` only if this root is still the newest
                self._verifier = exc

    def _make_verifier(self) -> None:
        from tmplbuild.sign.verify import Verifier

        try:
            self._verifier = Verifier(self.source.keys, self.source.fingerprints)
        except BaseException as exc:  # handed to the main thread by `verifier`
            self._verifier = exc

    @property
    def verifier(self) -> Verifier:
        """The pinned verifier. Raises what making it raised (UsageError for a bad or weak pinned key)."""
        if self.source.pins_root or self._making is None:
            raise AssertionError("a root source has no pinned index key: its verifier comes from the root")
        self._making.join()
        if isinstance(self._verifier, BaseException):
            raise self._verifier
        assert self._verifier is not None
        return self._verifier

    def _close_verifier(self) -> None:
        for verifier in self._root_verifiers.values():
            verifier.close()
        self._root_verifiers.clear()
        if self._making is None:
            return
        self._making.join()
        if self._verifier is not None and not isinstance(self._verifier, BaseException):
            self._verifier.close()

    def close(self) -> None:
        try:
            self.transport.close()
        finally:
            self._close_verifier()

    def __enter__(self) -> Updater:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- a root source

    def _root_fetch(self, base: str):
        """A tmplbuild.repo.root.Fetch over one mirror: 404 for the document is "no such root"; anything else
        that is not a 200 is a TransportError (a document without its signatures too)."""
        from tmplbuild.repo import root as rootdoc

        def fetch(version: int) -> tuple[bytes, bytes] | None:
            rel = rootdoc.path(version)
            data = self.transport.get_optional(f"{base}/{rel}", rootdoc.DOC_CAP, rel, document=True)
            if data is None:
                return None
            return data, self.transport.get_bytes(f"{base}/{rel}.asc", rootdoc.SIGNATURE_CAP, f"{rel}.asc", document=True)
        return fetch

    def trusted_root(self, base: str) -> Root:
        """The newest root of one mirror, trusted from the run's root (or anchored by the pinned root keys),
        and not expired. Raises AuthenticityError (SignatureError) 3, FreshnessError ("root rollback", "root
        expired") 4, TransportError 5."""
        from tmplbuild.repo import root as rootdoc

        if self._making is not None:  # the first mirror: the trusted root read in the background
            self._making.join()
            if self._loading is not None:
                raise self._loading
        fetch = self._root_fetch(base)
        if self.root is None:
            try:
                chain = rootdoc.anchor_and_walk(self.source.root_keys, fetch)
            except AuthenticityError as exc:
                if exc.check == "root pin" and fetch(1) is None:
                    self._index_or_none(base)  # no root 1 and no index: not a repository at all (exit 5)
                raise
            stored = None
        else:
            stored = self.root
            chain = [self.root, *rootdoc.walk(self.root, fetch)]
        newest = chain[-1]
        self.root = newest  # checked against what was trusted: later mirrors start from it
        if newest is not stored:
            state.record_root(self.source.state_key, newest)  # persisted at once, whatever the index does
        rootdoc.check_fresh(newest)
        return newest

    def _root_verifier(self, doc: Root) -> RootVerifier:
        """The verifier of `doc`'s online keys (made once per run). Raises AuthenticityError("root keys")."""
        from tmplbuild.repo.root import RootVerifier

        if self._making is not None:  # the one made in the background for the stored root: taken once
            self._making.join()
            made, self._making, self._verifier = self._verifier, None, None
            if isinstance(made, RootVerifier):
                self._root_verifiers[made.root.sha256] = made
            # an error is not raised here: the stored root may no longer be the newest; if it is, it is made
            # again below and raises then
        if doc.sha256 not in self._root_verifiers:
            self._root_verifiers[doc.sha256] = RootVerifier(doc)
        return self._root_verifiers[doc.sha256]

    # -- the index

    def index(self, base: str) -> trust.TrustedIndex:
        """Fetch and check (1-6) one mirror's index (for a root source, after the mirror's roots: see the module
        docstring). A pair that does not verify is fetched once more before the mirror counts as failed: the two
        files cannot be swapped in one step, so a reader racing the publisher's renames can see a new index with
        the old signature (or the reverse) for a moment."""
        last, pinned_repo_id = self.last, self.source.repo_id
        if self.source.pins_root:
            newest = self.trusted_root(base)
            verifier = self._root_verifier(newest)
            pinned_repo_id = pinned_repo_id or newest.repo_id
            if last is not None and state.rotated(self.last_online, newest.online.keys):
                last = None  # fast-forward recovery: the version bar goes, the repo_id stays pinned (the root's)
        else:
            newest, verifier = None, self.verifier
        for attempt in (1, 2):
            data = self._index_or_none(base)
            sig = self.transport.get_bytes(f"{base}/index.json.asc", trust.SIGNATURE_CAP, "index.json.asc",
                                           document=True)
            try:
                trusted = trust.check_index(data, sig, verifier, pinned_repo_id=pinned_repo_id, last=last)
                break
            except SignatureError as exc:
                if attempt == 2:
                    raise SignatureError(exc.check, f"{base}/index.json: {exc.message}") from None
        if last is None or last.repo_id != trusted.index.repo_id or trusted.index.version > last.version:
            self.last = trusted.seen  # the bar rises: a later mirror may not answer with an older index
            if newest is not None:
                self.last_online = newest.online.keys
        self.index_root = newest
        return trusted

    def _index_or_none(self, base: str) -> bytes:
        """index.json of `base`. Its 404 means there is no repository at that URL at all (a wrong path, most
        likely), which is what the user must hear first: TransportError("repository"), exit 5."""
        data = self.transport.get_optional(f"{base}/index.json", trust.INDEX_CAP, "index.json", document=True)
        if data is None:
            raise TransportError("repository", f"no tmplbuild repository at {base} (index.json: 404); check the URL")
        return data

    def over_mirrors(self, attempt: Callable[[str], T]) -> T:
        """`attempt(base_url)` on each mirror in order until one passes every check. When all fail, raise the
        most severe failure: an authenticity failure (3) over a freshness failure (4) over "not found" (2) over
        a transport failure (5), the last one among equals. A mirror that is down must not hide that another
        one served a forged or replayed index. Local failures (7) stop at once: another mirror cannot help."""
        worst: Exception | None = None
        failed_at = ""
        for base in self.source.urls:
            try:
                result = attempt(base)
            except (AuthenticityError, FreshnessError, UsageError, TransportError) as exc:
                self.warnings.append(f"tmplbuild: warning: mirror {base} skipped: {exc}")
                if worst is None or severity(exc) >= severity(worst):
                    worst, failed_at = exc, base
                continue
            for line in self.warnings:
                print(line, file=sys.stderr)
            return result
        assert worst is not None
        if len(self.source.urls) > 1:
            raise type(worst)(worst.check, f"{worst.message} (mirror {failed_at}; all {len(self.source.urls)} "
                                           "mirrors failed)")
        raise worst

    def refresh(self) -> trust.TrustedIndex:
        """The newest index any mirror serves that passes checks 1-6."""
        return self.over_mirrors(self.index)

    def commit(self, trusted: trust.TrustedIndex) -> None:
        """Record the index this run acted on (the rollback bar of the next run). Called only after the whole
        run succeeded: a refused index or a failed download never reaches the state. For a root source, the
        root it was accepted under is stored with it."""
        state.record(self.source.state_key, trusted.seen, self.source.label, root=self.index_root)
