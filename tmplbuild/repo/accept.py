"""Index acceptance: the one place that decides whether a signed index.json may be acted on. The client
(tmplbuild.client.trust.check_index), the server's upload check (repo_server/upload.py), the server's page
(repo_server/verified.py, "expired") and `tmplbuild repo verify` (tmplbuild.repo.manage.audit) all ask here,
so they cannot disagree about a boundary.

The checks, in DESIGN.md's order (size caps come before, and belong to whoever downloads):
  signature   exactly one good signature over the exact bytes, by a pinned key   AuthenticityError 3 (Verifier)
  schema      index.parse: strict JSON, every field typed, every integer in its   AuthenticityError 3
              documented range, 0 < expires - generated <= MAX_LIFETIME           ("index schema")
  repo_id     equals the pinned one                                               AuthenticityError 3
  freshness   expired iff now >= expires (the one boundary: at the second named   FreshnessError 4
              by `expires` the index is already expired); generated more than
              MAX_CLOCK_SKEW seconds ahead of now is refused
  successor   client: version not below the last one seen, same version same      FreshnessError 4
              bytes (check_not_rolled_back); upload: version exactly the current
              one + 1 (check_successor)
  a file      its size, sha256 and sha512 against the entry that lists it      AuthenticityError 3
              (file_problem / check_file: the client's download, `verify FILE`, the audit and the upload)

Pure: no I/O beyond the Verifier's own gpg run."""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Protocol

from tmplbuild.errors import AuthenticityError, FreshnessError
from tmplbuild.repo import index as idx
from tmplbuild.repo.index import MAX_LIFETIME, SIZE_MAX, SIZE_MIN, VERSION_MAX, VERSION_MIN  # noqa: F401

MAX_CLOCK_SKEW = 300  # seconds an index's `generated` may be ahead of the reader's clock


class SignatureChecker(Protocol):
    def verify(self, data: bytes, signature: bytes): ...  # tmplbuild.sign.verify.Verifier


@dataclass(frozen=True)
class Seen:
    """The last index a remote's client accepted (kept in tmplbuild.client.state)."""

    repo_id: str
    version: int
    sha256: str


@dataclass(frozen=True)
class TrustedIndex:
    index: idx.Index
    sha256: str  # of the exact bytes that were verified
    signer: str  # primary fingerprint of the key that signed them

    @property
    def seen(self) -> Seen:
        return Seen(self.index.repo_id, self.index.version, self.sha256)


def _stamp(t: float) -> str:
    return idx.stamp(t)


def verify_and_parse(data: bytes, signature: bytes, verifier: SignatureChecker):
    """Signature over the exact bytes, then the strict schema. Returns (index, the Verifier's result). Raises
    AuthenticityError ("signature" and the like from the Verifier, "index schema" from the parse)."""
    verified = verifier.verify(data, signature)
    return idx.parse(data), verified


def check_repo_id(index: idx.Index, expected: str | None) -> None:
    """Raises AuthenticityError("repo id") when `expected` is given and differs."""
    if expected is not None and index.repo_id != expected:
        raise AuthenticityError("repo id", f"found {index.repo_id!r}, expected {expected!r} (pinned)")


def is_expired(index: idx.Index, now: float) -> bool:
    """The one expiry boundary: expired iff now >= expires."""
    return now >= idx.parse_stamp(index.expires)


def is_from_the_future(index: idx.Index, now: float, skew: int = MAX_CLOCK_SKEW) -> bool:
    return idx.parse_stamp(index.generated) > now + skew


def check_fresh(index: idx.Index, now: float, skew: int = MAX_CLOCK_SKEW) -> None:
    """Raises FreshnessError("index expired") when is_expired, FreshnessError("index from the future") when
    `generated` is more than `skew` seconds ahead of `now`."""
    if is_expired(index, now):
        raise FreshnessError("index expired", f"expired at {index.expires}, now {_stamp(now)}")
    if is_from_the_future(index, now, skew):
        raise FreshnessError("index from the future", f"generated {index.generated}, now {_stamp(now)} (more than "
                                                      f"{skew // 60} minutes ahead: check the clock)")


def check_not_rolled_back(last: Seen | None, index: idx.Index, sha256: str) -> None:
    """The client's rollback bar: against the last index accepted for the same repo_id, the version must not
    be lower, and the same version must be the same bytes. Raises FreshnessError("rollback")."""
    if last is None or last.repo_id != index.repo_id:
        return
    if index.version < last.version:
        raise FreshnessError("rollback", f"index version {index.version}, expected at least {last.version} "
                                         "(the last one seen)")
    if index.version == last.version and sha256 != last.sha256:
        raise FreshnessError("rollback", f"index version {index.version} has sha256 {sha256}, expected "
                                         f"{last.sha256} (the index seen before under the same version)")


def is_successor(old: idx.Index, new: idx.Index) -> bool:
    """A publisher's next index: same repo_id, version exactly old + 1 (so strictly above it)."""
    return new.repo_id == old.repo_id and new.version == old.version + 1


def check_successor(old: idx.Index, new: idx.Index) -> None:
    """A publisher's next index (what the server's upload accepts): same repo_id, version exactly old + 1.
    Raises AuthenticityError("repo id"), FreshnessError("index version")."""
    check_repo_id(new, old.repo_id)
    if not is_successor(old, new):
        raise FreshnessError("index version", f"version {new.version}, expected {old.version + 1} (current + 1)")


def accept_index(data: bytes, signature: bytes, verifier: SignatureChecker, *, pinned_repo_id: str | None,
                 last: Seen | None, now: float | None = None) -> TrustedIndex:
    """The client's checks 2 to 6 on one index pair. `pinned_repo_id`: the admin's pin, if any; else the repo_id
    recorded in `last` is the pin; with neither (first use) any repo_id is accepted. Raises AuthenticityError,
    FreshnessError."""
    now = time.time() if now is None else now
    index, verified = verify_and_parse(data, signature, verifier)
    check_repo_id(index, pinned_repo_id or (last.repo_id if last else None))
    check_fresh(index, now)
    digest = hashlib.sha256(data).hexdigest()
    check_not_rolled_back(last, index, digest)
    return TrustedIndex(index=index, sha256=digest, signer=verified.fingerprint)


def file_problem(ref: idx.FileRef, size: int, sha256: str, sha512: str, what: str | None = None) -> \
        AuthenticityError | None:
    """The one "file against its signed entry" check: the first of size, sha256 and sha512 that differs (sha512
    when the entry carries one: a manifest's reference has size and sha256 only), as an AuthenticityError whose
    check names it; None when all match."""
    what = what or ref.path
    if size != ref.size:
        return AuthenticityError("size", f"{what}: size {size}, expected {ref.size} (signed)")
    if sha256 != ref.sha256:
        return AuthenticityError("sha256", f"{what}: sha256 {sha256}, expected {ref.sha256} (signed)")
    if ref.sha512 and sha512 != ref.sha512:
        return AuthenticityError("sha512", f"{what}: sha512 {sha512}, expected {ref.sha512} (signed)")
    return None


def check_file(ref: idx.FileRef, size: int, sha256: str, sha512: str, what: str | None = None) -> None:
    """`file_problem`, raised."""
    problem = file_problem(ref, size, sha256, sha512, what)
    if problem is not None:
        raise problem
