"""The client's update layer, between the verbs (tmplbuild.client.commands: argparse and output) and the pure
trust decisions (tmplbuild.client.trust), as python-tuf's ngclient separates its updater, trusted set and
fetcher:

- `Source`: where a run gets its index from and what must have signed it (a configured remote or a one-off URL);
- `Updater`: one run against one source. It owns the pinned verifier and the HTTP transport, walks the mirrors
  in order, keeps the rollback bar (the state's last index, raised by every index verified in this run), and
  records the accepted index in the client state only once the whole run succeeded (`commit`).

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
    from tmplbuild.sign.verify import Verifier

T = TypeVar("T")


@dataclass(frozen=True)
class Source:
    """Where a run gets its index from and what must have signed it."""

    label: str  # "remote NAME" or the URL, for messages and the state file
    urls: tuple[str, ...]
    keys: bytes
    fingerprints: tuple[str, ...]
    repo_id: str | None
    state_key: str


def remote_source(name: str | None) -> Source:
    """The configured remote `name` (or the only one configured). Raises UsageError."""
    from tmplbuild.client import config

    remote = config.get(name)
    return Source(label=f"remote {remote.name}", urls=remote.urls, keys=remote.key_material(),
                  fingerprints=remote.fingerprints, repo_id=remote.repo_id,
                  state_key=state.key_for_remote(remote.name))


def url_source(urls: list[str], keys: bytes, fingerprints: tuple[str, ...], repo_id: str | None) -> Source:
    """A one-off repository: its mirror URLs with the pinned key material. Raises UsageError."""
    from tmplbuild.client import config

    checked = config.check_urls(urls)
    return Source(label=checked[0], urls=checked, keys=keys, fingerprints=fingerprints,
                  repo_id=config.check_repo_id(repo_id) if repo_id else None,
                  state_key=state.key_for_urls(checked))


# Least to most severe: when every mirror failed, the most severe failure is the one reported.
_SEVERITY = (TransportError, UsageError, FreshnessError, AuthenticityError)


def severity(exc: Exception) -> int:
    return max(rank for rank, kind in enumerate(_SEVERITY) if isinstance(exc, kind))


class Updater:
    """One run against one source. Use as a context manager."""

    def __init__(self, source: Source) -> None:
        self.source = source
        self.last = state.load(source.state_key)
        self.warnings: list[str] = []
        # The pinned verifier is made (gpg imports and lists the keys) on another thread while this one loads
        # the HTTP stack and fetches the first index: the two overlap instead of adding up. Its result, or its
        # error, is taken before the first signature is checked, so nothing is checked any later or any less.
        self._making = threading.Thread(target=self._make_verifier, daemon=True)
        self._verifier: Verifier | BaseException | None = None
        self._making.start()
        try:
            from tmplbuild.client.download import Transport

            self.transport = Transport()
        except BaseException:
            self._close_verifier()
            raise

    def _make_verifier(self) -> None:
        from tmplbuild.sign.verify import Verifier

        try:
            self._verifier = Verifier(self.source.keys, self.source.fingerprints)
        except BaseException as exc:  # handed to the main thread by `verifier`
            self._verifier = exc

    @property
    def verifier(self) -> Verifier:
        """The pinned verifier. Raises what making it raised (UsageError for a bad or weak pinned key)."""
        self._making.join()
        if isinstance(self._verifier, BaseException):
            raise self._verifier
        assert self._verifier is not None
        return self._verifier

    def _close_verifier(self) -> None:
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

    def index(self, base: str) -> trust.TrustedIndex:
        """Fetch and check (1-6) one mirror's index. A pair that does not verify is fetched once more before
        the mirror counts as failed: the two files cannot be swapped in one step, so a reader racing the
        publisher's renames can see a new index with the old signature (or the reverse) for a moment."""
        for attempt in (1, 2):
            data = self.transport.get_bytes(f"{base}/index.json", trust.INDEX_CAP, "index.json")
            sig = self.transport.get_bytes(f"{base}/index.json.asc", trust.SIGNATURE_CAP, "index.json.asc")
            try:
                trusted = trust.check_index(data, sig, self.verifier, pinned_repo_id=self.source.repo_id,
                                            last=self.last)
                break
            except SignatureError as exc:
                if attempt == 2:
                    raise SignatureError(exc.check, f"{base}/index.json: {exc.message}") from None
        last = self.last
        if last is None or last.repo_id != trusted.index.repo_id or trusted.index.version > last.version:
            self.last = trusted.seen  # the bar rises: a later mirror may not answer with an older index
        return trusted

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
        run succeeded: a refused index or a failed download never reaches the state."""
        state.record(self.source.state_key, trusted.seen, self.source.label)
