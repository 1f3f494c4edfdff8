"""The root of trust: TUF's root role with GnuPG keys.

A repository's root documents live at `root/<N>.root.json`, each with `root/<N>.root.json.asc` beside it: one
or more armored detached signatures over the exact bytes, concatenated (one per signing key; holders sign on
their own machines and the blocks are appended). A root names

- the root keys and their threshold (m of n): they sign the next root, and are kept offline;
- the online keys and their threshold (k of j): they sign index.json (and, one key each, the per-file .asc
  and SHA256SUMS.gpg), and live with CI;
- its repo_id, its version (1, 2, 3, ... with no gaps), when it was generated and when it expires.

The public keys themselves are embedded (armored), so a client needs nothing but the root fingerprints it
pinned, or one root document it got out of band.

The rules, as TUF's client workflow (5.3) states them:
  anchor      with pinned fingerprints only, the first root (from version 1 up) whose root role is signed by
              a threshold of keys that are both pinned and named by it is trusted (AuthenticityError 3 if none)
  successor   root N+1 must carry version N+1 and the repo_id of root N (FreshnessError "root rollback" for a
              version at or below N, AuthenticityError otherwise), be signed by a threshold of root N's root
              keys AND by a threshold of its own root keys (AuthenticityError "root signature")
  walk        from the trusted root, N+1, N+2, ... until the repository has no next one (at most MAX_WALK)
  freshness   the newest root, once reached, must not be expired: now >= expires (FreshnessError 4);
              intermediate roots may have expired meanwhile
  the index   signed by a threshold of the newest root's online keys (RootVerifier, SignatureError 3)

Signatures that cannot be used (by a key the role does not name, bad, by an expired key) are not counted and
do not fail a document that has enough good ones, as in TUF. Everything else about each signature is
tmplbuild.sign.verify.Verifier's rule (document class, digest, key validity and strength).
"""
from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from tmplbuild import strictjson
from tmplbuild.errors import AuthenticityError, FreshnessError, SignatureError, UsageError
from tmplbuild.repo import index as idx
from tmplbuild.sign.keys import normalise_fingerprint

TYPE = "tmplbuild-root"
SCHEMA = 1
DIRECTORY = "root"
FILE = re.compile(r"\A([1-9][0-9]{0,15})\.root\.json\Z")
ROLES = ("root", "index")  # the JSON names of the two roles
MAX_KEYS = 32  # keys in one root document
MAX_SIGNATURES = 64  # armored blocks in one signature file
DOC_CAP = 1 << 20  # bytes of a root document
SIGNATURE_CAP = 256 << 10  # bytes of its signature file
MAX_LIFETIME = 5 * 366 * 86400  # expires - generated, at most (a root is re-signed offline, rarely)
DEFAULT_LIFETIME = 365 * 86400
MAX_WALK = 256  # new roots taken in one update: more is a mirror feeding an endless chain
_SIGNATURE_RE = re.compile(rb"-----BEGIN PGP SIGNATURE-----\r?\n.*?-----END PGP SIGNATURE-----", re.S)
_KEY_RE = re.compile(r"\A-----BEGIN PGP PUBLIC KEY BLOCK-----\r?\n.*-----END PGP PUBLIC KEY BLOCK-----\s*\Z", re.S)


class NotNextRoot(Exception):
    """Mixed into the errors for a root that is not the next version (what a server answers 409 Conflict):
    RootRollbackError at or below the trusted one, RootVersionError past the next one."""


class RootRollbackError(FreshnessError, NotNextRoot):
    def __init__(self, message: str) -> None:
        super().__init__("root rollback", message)


class RootVersionError(AuthenticityError, NotNextRoot):
    def __init__(self, message: str) -> None:
        super().__init__("root version", message)


def file_name(version: int) -> str:
    return f"{version}.root.json"


def files_in(repo: Path) -> set[str]:
    """The root documents and signature files in a repository directory (root/<N>.root.json and its .asc), as
    paths relative to it; other names in root/ are not part of any chain."""
    return {f"{DIRECTORY}/{p.name}" for p in (repo / DIRECTORY).glob("*") if FILE.match(p.name.removesuffix(".asc"))}


def path(version: int) -> str:
    """Repository-relative path of root `version`; its signature is this + ".asc"."""
    return f"{DIRECTORY}/{file_name(version)}"


@dataclass(frozen=True)
class Role:
    keys: tuple[str, ...]  # primary fingerprints
    threshold: int


@dataclass(frozen=True)
class Root:
    """One parsed root document and its exact bytes."""

    repo_id: str
    version: int
    generated: str
    expires: str
    keys: tuple[tuple[str, str], ...]  # (fingerprint, armored public key), sorted
    root: Role
    online: Role
    raw: bytes

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.raw).hexdigest()

    def key(self, fingerprint: str) -> bytes:
        return dict(self.keys)[fingerprint].encode()

    def material(self, role: Role) -> bytes:
        """The armored public keys of a role, concatenated (what a Verifier imports)."""
        return b"\n".join(self.key(f) for f in role.keys)

    def describe(self) -> str:
        return (f"root {self.version} of {self.repo_id}: root keys {self.root.threshold} of "
                f"{len(self.root.keys)}, online keys {self.online.threshold} of {len(self.online.keys)}, "
                f"expires {self.expires}")


# -- making and parsing ----------------------------------------------------------------------------------------

def render(repo_id: str, version: int, keys: dict[str, bytes], root: Role, online: Role, expires_in: int,
           now: float | None = None) -> bytes:
    """The bytes of a new root document (not yet signed). `keys`: fingerprint -> armored public key, for every
    key either role names. Raises UsageError for what `parse` would refuse (the document is parsed back)."""
    check_lifetime(expires_in)
    now = time.time() if now is None else now
    used = dict.fromkeys([*root.keys, *online.keys])
    missing = [f for f in used if f not in keys]
    if missing:
        raise UsageError("root", f"no public key given for {missing[0]}")
    doc = {
        "type": TYPE, "schema": SCHEMA, "repo_id": repo_id, "version": version,
        "generated": idx.stamp(now), "expires": idx.stamp(now + expires_in),
        "keys": {f: {"public": keys[f].decode("ascii", "replace").strip() + "\n"} for f in sorted(used)},
        "roles": {"root": {"keys": list(root.keys), "threshold": root.threshold},
                  "index": {"keys": list(online.keys), "threshold": online.threshold}},
    }
    data = (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()
    try:
        parse(data)
    except AuthenticityError as exc:
        raise UsageError("root", exc.message) from None
    return data


def check_lifetime(expires_in: int) -> None:
    if not 0 < expires_in <= MAX_LIFETIME:
        raise UsageError("duration", f"root lifetime {expires_in}s, expected 1s to {MAX_LIFETIME // 86400}d")


class _Bad(Exception):
    pass


def parse(data: bytes) -> Root:
    """A strict parse of root bytes (before or after their signatures were checked: nothing here trusts them).
    Raises AuthenticityError("root schema") naming the field."""
    try:
        if len(data) > DOC_CAP:
            raise _Bad(f"{len(data)} bytes, expected at most {DOC_CAP}")
        doc = strictjson.loads(data, what="root", max_depth=8)
        if not isinstance(doc, dict):
            raise _Bad("top level is not an object")
        if doc.get("type") != TYPE:
            raise _Bad(f"type: found {str(doc.get('type'))[:40]!r}, expected {TYPE!r}")
        if type(doc.get("schema")) is not int or doc["schema"] != SCHEMA:
            raise _Bad(f"schema: found {doc.get('schema')!r}, expected {SCHEMA}")
        unknown = set(doc) - {"type", "schema", "repo_id", "version", "generated", "expires", "keys", "roles"}
        if unknown:
            raise _Bad(f"unknown field {sorted(unknown)[0]!r}")
        repo_id = doc.get("repo_id")
        if not isinstance(repo_id, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", repo_id):
            raise _Bad("repo_id: expected letters, digits and . _ - (at most 128)")
        version = doc.get("version")
        if type(version) is not int or not idx.VERSION_MIN <= version <= idx.VERSION_MAX:
            raise _Bad(f"version: found {version!r}, expected {idx.VERSION_MIN} to {idx.VERSION_MAX}")
        stamps = []
        for name in ("generated", "expires"):
            try:
                stamps.append(idx.parse_stamp(doc.get(name)))
            except ValueError:
                raise _Bad(f"{name}: expected YYYY-MM-DDTHH:MM:SSZ") from None
        if not 0 < stamps[1] - stamps[0] <= MAX_LIFETIME:
            raise _Bad(f"expires - generated: {stamps[1] - stamps[0]}s, expected 1s to {MAX_LIFETIME}s")
        keys = _keys(doc.get("keys"))
        roles = doc.get("roles")
        if not isinstance(roles, dict) or set(roles) != set(ROLES):
            raise _Bad(f"roles: expected exactly {', '.join(ROLES)}")
        root, online = (_role(roles[name], name, keys) for name in ROLES)
        unused = set(keys) - set(root.keys) - set(online.keys)
        if unused:
            raise _Bad(f"keys: {sorted(unused)[0]} is named by no role")
        return Root(repo_id=repo_id, version=version, generated=doc["generated"], expires=doc["expires"],
                    keys=tuple(sorted(keys.items())), root=root, online=online, raw=bytes(data))
    except (_Bad, ValueError) as exc:
        raise AuthenticityError("root schema", str(exc)) from None


def _keys(value: object) -> dict[str, str]:
    if not isinstance(value, dict) or not 0 < len(value) <= MAX_KEYS:
        raise _Bad(f"keys: expected an object of 1 to {MAX_KEYS} keys")
    keys = {}
    for fpr, entry in value.items():
        if not re.fullmatch(r"[0-9A-F]{40}", fpr):
            raise _Bad(f"keys: {fpr[:48]!r} is not a 40-hex-digit fingerprint in capitals")
        if not isinstance(entry, dict) or set(entry) != {"public"} or not isinstance(entry["public"], str) \
                or not _KEY_RE.match(entry["public"]) or not entry["public"].isascii():
            raise _Bad(f"keys.{fpr}: expected {{\"public\": an armored public key block}}")
        keys[fpr] = entry["public"]
    return keys


def _role(value: object, name: str, keys: dict[str, str]) -> Role:
    if not isinstance(value, dict) or set(value) != {"keys", "threshold"}:
        raise _Bad(f"roles.{name}: expected {{keys, threshold}}")
    fprs, threshold = value["keys"], value["threshold"]
    if not isinstance(fprs, list) or not fprs or not all(isinstance(f, str) for f in fprs):
        raise _Bad(f"roles.{name}.keys: expected a non-empty list of fingerprints")
    if len(set(fprs)) != len(fprs):
        raise _Bad(f"roles.{name}.keys: a fingerprint is listed twice")
    for f in fprs:
        if f not in keys:
            raise _Bad(f"roles.{name}.keys: {f[:48]} has no entry in keys")
    if type(threshold) is not int or not 1 <= threshold <= len(fprs):
        raise _Bad(f"roles.{name}.threshold: found {threshold!r}, expected 1 to {len(fprs)}")
    return Role(tuple(fprs), threshold)


def role(fingerprints: Iterable[str], threshold: int, what: str) -> Role:
    """A role from the command line: fingerprints normalised, threshold within 1..n. Raises UsageError."""
    fprs = tuple(dict.fromkeys(normalise_fingerprint(f, what) for f in fingerprints))
    if not fprs:
        raise UsageError(what, "no key given")
    if not 1 <= threshold <= len(fprs):
        raise UsageError(what, f"threshold {threshold}, expected 1 to {len(fprs)} (the number of keys)")
    return Role(fprs, threshold)


# -- signatures --------------------------------------------------------------------------------------------------

def split_signatures(signature: bytes, what: str) -> list[bytes]:
    """The armored signature blocks of a signature file, in order. Raises SignatureError when there is none, when
    anything but whitespace lies between them, or when there are more than MAX_SIGNATURES."""
    blocks, pos = [], 0
    for m in _SIGNATURE_RE.finditer(signature):
        if signature[pos:m.start()].strip():
            break
        blocks.append(m.group())
        pos = m.end()
    else:
        if not signature[pos:].strip() and blocks:
            if len(blocks) > MAX_SIGNATURES:
                raise SignatureError("signature", f"{what}: {len(blocks)} signatures, expected at most "
                                                  f"{MAX_SIGNATURES}")
            return blocks
    raise SignatureError("signature", f"{what}: expected one or more armored detached signatures "
                                      "(-----BEGIN PGP SIGNATURE-----), one per key, and nothing else")


def _verifier(material: bytes, fingerprints: tuple[str, ...], what: str):
    """A Verifier over keys a root embeds. A root whose keys do not import, or are weak, is not something to
    trust: AuthenticityError("root keys") rather than the UsageError a misconfigured pin gets."""
    from tmplbuild.sign.verify import Verifier

    try:
        return Verifier(material, fingerprints)
    except UsageError as exc:
        raise AuthenticityError("root keys", f"{what}: {exc.message}") from None


@dataclass(frozen=True)
class Count:
    good: tuple[str, ...]  # distinct primary fingerprints of the role with a good signature, in order
    refused: tuple[str, ...]  # why each other block was not counted
    first: object = None  # the Verified of the first good signature

    def reason(self) -> str:
        return f" ({self.refused[0]})" if self.refused else ""


def _count(verify: Callable[[bytes], object], blocks: list[bytes]) -> Count:
    good: dict[str, object] = {}
    refused = []
    for block in blocks:
        try:
            verified = verify(block)
        except SignatureError as exc:
            refused.append(exc.message)
            continue
        good.setdefault(verified.fingerprint, verified)  # type: ignore[attr-defined]
    return Count(tuple(good), tuple(refused), next(iter(good.values()), None))


def blocks_of(signature: bytes, what: str) -> list[bytes]:
    """The signatures of a signature file: its armored blocks, or a binary signature whole (SHA256SUMS.gpg: the
    Verifier refuses a binary file holding more than one)."""
    if signature.lstrip().startswith(b"-----BEGIN PGP SIGNATURE-----"):
        return split_signatures(signature, what)
    return [signature]


def count_signatures(data: bytes, signature: bytes, doc: Root, role: Role, what: str) -> Count:
    """The good signatures over `data` by keys of `role`, with the public keys `doc` embeds."""
    blocks = blocks_of(signature, what)
    with _verifier(doc.material(role), role.keys, what) as verifier:
        return _count(lambda b: verifier.verify(data, b), blocks)


def _need(count: Count, role: Role, threshold_of: str, what: str, only: set[str] | None = None) -> None:
    good = [f for f in count.good if only is None or f in only]
    if len(good) < role.threshold:
        by = ", ".join(good) or "none"
        if only is not None:
            # Pinned out of band: the keys the document names are only the server's claim. Printed as
            # "expected", a user who mistyped a pin would copy them from here, and pinning would prove nothing.
            raise SignatureError("root signature",
                                 f"{what}: {len(good)} good signature(s) by {threshold_of} ({by}), expected "
                                 f"{role.threshold}; check the fingerprints you pinned against the ones the "
                                 f"maintainers gave you out of band (the server claims root keys "
                                 f"{', '.join(role.keys)}: a claim, not proof){count.reason()}")
        raise SignatureError("root signature", f"{what}: {len(good)} good signature(s) by {threshold_of} ({by}), "
                                               f"expected {role.threshold} of {', '.join(role.keys)}"
                                               f"{count.reason()}")


# -- the chain ---------------------------------------------------------------------------------------------------

def check_anchor(data: bytes, signature: bytes, pinned: Iterable[str], what: str = "root") -> Root:
    """A root trusted through pinned fingerprints: signed by a threshold of its own root keys, counting only
    keys that are pinned. Raises AuthenticityError ("root schema", "root keys", "root signature")."""
    doc = parse(data)
    pins = {normalise_fingerprint(p, "root fingerprint") for p in pinned}
    what = f"{what} (version {doc.version})"
    _need(count_signatures(data, signature, doc, doc.root, what), doc.root,
          f"pinned root keys ({', '.join(sorted(pins))})", what, only=pins)
    return doc


def check_self_signed(data: bytes, signature: bytes, what: str = "root") -> Root:
    """A first root trusted as the start of a repository's own chain: signed by a threshold of its root keys."""
    doc = parse(data)
    what = f"{what} (version {doc.version})"
    _need(count_signatures(data, signature, doc, doc.root, what), doc.root, "its own root keys", what)
    return doc


def check_successor(trusted: Root, data: bytes, signature: bytes, what: str | None = None) -> Root:
    """Root trusted.version + 1, by TUF's rule: same repo_id, exactly the next version, signed by a threshold of
    the trusted root's root keys and by a threshold of its own. Raises RootRollbackError (FreshnessError "root
    rollback"), RootVersionError (AuthenticityError "root version"), AuthenticityError ("root schema", "root
    keys", "root signature")."""
    expected = trusted.version + 1
    what = what or path(expected)
    new = parse(data)
    if new.repo_id != trusted.repo_id:
        raise AuthenticityError("root", f"{what}: repo_id {new.repo_id!r}, expected {trusted.repo_id!r}")
    if new.version <= trusted.version:
        raise RootRollbackError(f"{what}: version {new.version}, expected {expected} (root {trusted.version} is "
                                "already trusted)")
    if new.version != expected:
        raise RootVersionError(f"{what}: version {new.version}, expected {expected}")
    _need(count_signatures(data, signature, trusted, trusted.root, what), trusted.root,
          f"the root keys of root {trusted.version}", what)
    _need(count_signatures(data, signature, new, new.root, what), new.root, "its own root keys", what)
    return new


def is_expired(doc: Root, now: float) -> bool:
    return now >= idx.parse_stamp(doc.expires)


def check_fresh(doc: Root, now: float | None = None) -> None:
    """Raises FreshnessError("root expired") when the newest root is expired (now >= expires)."""
    now = time.time() if now is None else now
    if is_expired(doc, now):
        raise FreshnessError("root expired", f"root {doc.version} of {doc.repo_id} expired at {doc.expires}, now "
                                             f"{idx.stamp(now)}: the root key holders must sign a new root")


Fetch = Callable[[int], "tuple[bytes, bytes] | None"]  # version -> (document, signature), None: no such root


def walk(trusted: Root, fetch: Fetch, limit: int = MAX_WALK) -> list[Root]:
    """The roots after `trusted`, each checked against the one before (check_successor), until `fetch` has no
    next one. Returns them in order (empty: `trusted` is still the newest). Freshness is the caller's
    (check_fresh on the last). Raises what check_successor raises, AuthenticityError("root chain") past
    `limit`, and what `fetch` raises."""
    chain: list[Root] = []
    current = trusted
    while True:
        got = fetch(current.version + 1)
        if got is None:
            return chain
        if len(chain) >= limit:
            raise AuthenticityError("root chain", f"more than {limit} new roots after root {trusted.version}")
        current = check_successor(current, *got)
        chain.append(current)


def anchor_and_walk(pinned: Iterable[str], fetch: Fetch, limit: int = MAX_WALK) -> list[Root]:
    """For a client that pinned root fingerprints and trusts no root yet: from version 1 up, the first root
    signed by a threshold of pinned keys (earlier ones are skipped, unused), then the walk from it. Returns the
    trusted chain from the anchor (at least one root). Raises AuthenticityError("root pin") when no root
    anchors, what check_anchor / walk raise."""
    pins = tuple(pinned)
    version, last_problem = 1, ""
    while True:
        got = fetch(version)
        if got is None:
            if version == 1:
                raise AuthenticityError("root pin", "the repository has no root/1.root.json: it publishes no root "
                                                    "of trust (pin its index key instead, or ask its maintainer)")
            raise AuthenticityError("root pin", f"none of the repository's roots 1 to {version - 1} is signed by "
                                                f"a threshold of the pinned root keys {', '.join(pins)}"
                                                f"{last_problem}")
        try:
            anchor = check_anchor(*got, pins, what=path(version))
        except SignatureError as exc:
            last_problem = f" (root {version}: {exc.message})"
            if version >= limit:
                raise AuthenticityError("root pin", f"no root up to version {version} is signed by a threshold "
                                                    f"of the pinned root keys{last_problem}") from None
            version += 1
            continue
        return [anchor, *walk(anchor, fetch, limit)]


# -- what the online keys sign ------------------------------------------------------------------------------------

class RootVerifier:
    """Verifies what the online keys of one root sign, with Verifier's interface (verify, verify_file, close,
    `pinned`): `verify` needs a threshold of good signatures by distinct online keys (index.json), and so does
    `verify_file` (a per-file .asc or SHA256SUMS.gpg: one signature each, as gpg and systemd-pull read them,
    so there a threshold above 1 is not asked; see `file_threshold`)."""

    def __init__(self, doc: Root, role: Role | None = None, file_threshold: int = 1) -> None:
        self.root = doc
        self.role = role or doc.online
        self.pinned = self.role.keys
        self.file_threshold = file_threshold
        self._verifier = _verifier(doc.material(self.role), self.role.keys, f"online keys of root {doc.version}")

    def _check(self, verify: Callable[[bytes], object], signature: bytes, threshold: int, what: str):
        blocks = blocks_of(signature, what)
        if len(blocks) == 1 and threshold <= 1:
            return verify(blocks[0])  # the Verifier's own message, unchanged, for the common case
        count = _count(verify, blocks)
        if len(count.good) < threshold:
            raise SignatureError("signature", f"{what}: {len(count.good)} good signature(s) by online keys of "
                                              f"root {self.root.version} ({', '.join(count.good) or 'none'}), "
                                              f"expected {threshold} of {', '.join(self.role.keys)}"
                                              f"{count.reason()}")
        return count.first

    def verify(self, data: bytes, signature: bytes, what: str = "signature"):
        """A threshold of the role's keys signed `data`. Returns the first good Verified. Raises SignatureError."""
        return self._check(lambda b: self._verifier.verify(data, b), signature, self.role.threshold, what)

    def verify_file(self, file: Path, signature: bytes, what: str = "signature"):
        return self._check(lambda b: self._verifier.verify_file(file, b), signature, self.file_threshold, what)

    def verify_message(self, signed: bytes):
        """A signed message (a simple signature of an OCI image) by one of the role's keys: one signature, as
        skopeo reads it. Returns (Verified, data). Raises SignatureError."""
        return self._verifier.verify_message(signed)

    def close(self) -> None:
        self._verifier.close()

    def __enter__(self) -> RootVerifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

