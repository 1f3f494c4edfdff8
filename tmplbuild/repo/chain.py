"""A repository directory's own trust: its root chain (root/<N>.root.json, tmplbuild.repo.root) when it has one,
else its pinned keys (keys/<FPR>.asc, a repository from before roots). The publisher (`publish`, `repo resign`,
`repo prune`), the server's upload check and start-up clean-up, the server's page and `repo verify` all ask
here, so none of them trusts the index by another rule than the clients'.

- `index_verifier()`: what a new index must satisfy: a threshold of the newest root's online keys (legacy: one
  of keys/).
- `base_verifier()`: what the index already in place must satisfy to be built upon (the successor of a publish,
  the list of files convergence keeps): signed under the newest root, or under an earlier root of the chain.
  An index signed by an online key that a later root dropped is still the repository's current state: the
  publisher says so (`carried_over`) instead of failing to read it; only a new signature by a current online
  key makes clients accept it again.
- `install(repo, data, sig)`: a new root, checked against the newest (TUF's successor rule; the first against
  its own root keys), written signature first, under the repository lock.

The root chain is read from version 1 and every step checked each time (a few gpg runs per root); the trust
anchor of a repository directory is its own root/1.root.json, self-signed by a threshold of its root keys."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from tmplbuild.errors import AuthenticityError, SignatureError, UsageError
from tmplbuild.repo import root as rootdoc
from tmplbuild.repo import store
from tmplbuild.repo.root import Root, RootVerifier


def local_fetch(repo: Path):
    """A `root.Fetch` over a repository directory. Raises AuthenticityError for a root without its signature."""
    def fetch(version: int) -> tuple[bytes, bytes] | None:
        doc = repo / rootdoc.path(version)
        try:
            data = doc.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise store.io_error("read", doc, exc) from None
        try:
            sig = (repo / (rootdoc.path(version) + ".asc")).read_bytes()
        except FileNotFoundError:
            raise AuthenticityError("root signature", f"{rootdoc.path(version)}.asc: missing") from None
        return data, sig
    return fetch


def read_chain(repo: Path) -> list[Root]:
    """Every root of the repository, from 1 (self-signed by a threshold of its root keys) through each successor;
    [] when it has none. Raises AuthenticityError / FreshnessError (a root that breaks the chain), and
    AuthenticityError("root chain") for a root file past a gap."""
    fetch = local_fetch(repo)
    first = fetch(1)
    if first is None:
        stray = sorted((repo / rootdoc.DIRECTORY).glob("*.root.json"))
        if stray:
            raise AuthenticityError("root chain", f"{stray[0].relative_to(repo)} without root/1.root.json")
        return []
    chain = [rootdoc.check_self_signed(*first, what=rootdoc.path(1))]
    chain += rootdoc.walk(chain[0], fetch, limit=10**6)
    newest = chain[-1].version
    for p in (repo / rootdoc.DIRECTORY).glob("*.root.json"):
        m = rootdoc.FILE.match(p.name)
        if m and int(m.group(1)) > newest:
            raise AuthenticityError("root chain", f"{rootdoc.DIRECTORY}/{p.name} after a gap: the chain ends at "
                                                  f"root {newest}")
    return chain


class HistoryVerifier:
    """Verifier's interface over a chain: the newest root's online keys first, then each earlier root's. The
    Verified it returns carries the root that accepted it (`.root_version`)."""

    def __init__(self, chain: list[Root]) -> None:
        self.chain = chain
        self._verifiers: dict[int, RootVerifier] = {}
        self.pinned = tuple(dict.fromkeys(f for r in chain for f in r.online.keys))
        self.last_root: Root | None = None

    def _get(self, doc: Root) -> RootVerifier:
        if doc.version not in self._verifiers:
            self._verifiers[doc.version] = RootVerifier(doc)
        return self._verifiers[doc.version]

    def _first(self, call):
        newest_error: SignatureError | None = None
        for doc in reversed(self.chain):
            try:
                verified = call(self._get(doc))
            except SignatureError as exc:
                newest_error = newest_error or exc
                continue
            self.last_root = doc
            return verified
        assert newest_error is not None
        raise newest_error

    def verify(self, data: bytes, signature: bytes, what: str = "signature"):
        return self._first(lambda v: v.verify(data, signature, what))

    def verify_file(self, path: Path, signature: bytes, what: str = "signature"):
        return self._first(lambda v: v.verify_file(path, signature, what))

    def verify_message(self, signed: bytes):
        return self._first(lambda v: v.verify_message(signed))

    def close(self) -> None:
        for v in self._verifiers.values():
            v.close()

    def __enter__(self) -> HistoryVerifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class RepoTrust:
    chain: list[Root] = field(default_factory=list)
    keys: store.RepoKeys | None = None  # a repository without roots: its keys/

    @property
    def root(self) -> Root | None:
        return self.chain[-1] if self.chain else None

    def index_verifier(self):
        """The verifier a new index (and what it lists) must pass."""
        if self.root is not None:
            return RootVerifier(self.root)
        from tmplbuild.sign.verify import Verifier

        assert self.keys is not None
        return Verifier(self.keys.public_keys, self.keys.fingerprints)

    def base_verifier(self):
        """The verifier the index in place must pass to be built upon (see the module docstring)."""
        if self.root is not None:
            return HistoryVerifier(self.chain)
        return self.index_verifier()

    def check_signer(self, fingerprint: str) -> None:
        """A publisher's key must be one the newest root names as online. Raises AuthenticityError("signer")."""
        if self.root is not None and fingerprint not in self.root.online.keys:
            raise AuthenticityError("signer", f"key {fingerprint} is not an online key of root {self.root.version} "
                                              f"(online keys: {', '.join(self.root.online.keys)}): clients would "
                                              "refuse what it signs")

    def check_fresh(self, now: float | None = None) -> None:
        """Raises FreshnessError("root expired") when the newest root is expired: clients refuse everything."""
        if self.root is not None:
            rootdoc.check_fresh(self.root, now)

    def carried_over(self, verifier) -> str | None:
        """After base_verifier() accepted the index in place: a warning line when an earlier root's online key,
        no longer named, signed it; else None."""
        if isinstance(verifier, HistoryVerifier) and verifier.last_root is not None \
                and self.root is not None and verifier.last_root.version != self.root.version:
            return (f"the index in place was signed under root {verifier.last_root.version} by a key root "
                    f"{self.root.version} no longer names; its entries are carried over into an index signed "
                    "by a current online key: review them (tmplbuild repo verify, tmplbuild list)")
        return None


def repo_trust(repo: Path) -> RepoTrust:
    """The repository's trust: its root chain, or (no root/) its keys/. Raises AuthenticityError /
    FreshnessError for a broken chain, UsageError when there is neither."""
    chain = read_chain(repo)
    if chain:
        return RepoTrust(chain=chain)
    return RepoTrust(keys=store.read_keys(repo))


def install(repo: Path, data: bytes, signature: bytes, *, timeout: float = 120.0) -> tuple[Root, list[str]]:
    """Publish a new root into a local repository: version 1 (signed by a threshold of its own root keys) when it
    has none, else exactly the next one (root.check_successor). The public keys of its online keys are written
    to keys/<FPR>.asc (what a person verifying SHA256SUMS.gpg by hand and systemd-pull's keyring take), and
    those of online keys the previous root named and this one does not are removed (for root 1: of every key
    keys/ held that it does not name as online). Returns the root and one
    line per key file written or removed. Raises AuthenticityError, FreshnessError, UsageError, LocalIOError."""
    with store.locked(repo, timeout):
        chain = read_chain(repo)
        if not chain:
            new = rootdoc.check_self_signed(data, signature, what="the new root")
            if new.version != 1:
                raise rootdoc.RootVersionError(f"the new root has version {new.version}, expected 1 (the "
                                               "repository has no root yet)")
            if (repo / store.INDEX).exists():
                _check_migration(repo, new)
        else:
            new = rootdoc.check_successor(chain[-1], data, signature, what="the new root")
        rootdoc.check_fresh(new)
        lines = []
        keys_dir = repo / "keys"
        # the keys to drop from keys/: those the newest root named (migration: every key keys/ held)
        old_online = set(chain[-1].online.keys) if chain else {p.stem for p in store.key_files(repo)}
        try:
            (repo / rootdoc.DIRECTORY).mkdir(exist_ok=True)
            keys_dir.mkdir(exist_ok=True)
            for fpr in new.online.keys:
                target = keys_dir / f"{fpr}.asc"
                if not target.exists() or target.read_bytes() != new.key(fpr):
                    store.write_durable(target.with_name(f".{fpr}.asc.tmp"), new.key(fpr))
                    os.replace(target.with_name(f".{fpr}.asc.tmp"), target)
                    lines.append(f"wrote keys/{fpr}.asc (online key)")
            # Signature first: a reader that sees the document finds its signature beside it.
            for rel, content in ((rootdoc.path(new.version) + ".asc", signature), (rootdoc.path(new.version), data)):
                tmp = repo / rootdoc.DIRECTORY / f".{os.path.basename(rel)}.tmp"
                store.write_durable(tmp, content)
                os.replace(tmp, repo / rel)
            store.fsync_dir(repo / rootdoc.DIRECTORY)
            for fpr in sorted(old_online - set(new.online.keys)):
                (keys_dir / f"{fpr}.asc").unlink(missing_ok=True)
                (keys_dir / f"{fpr}.gpg").unlink(missing_ok=True)
                lines.append(f"removed keys/{fpr}.asc (no longer an online key)")
            store.fsync_dir(keys_dir)
        except OSError as exc:
            raise store.io_error("write", repo / rootdoc.DIRECTORY, exc) from None
        return new, lines


def _check_migration(repo: Path, first: Root) -> None:
    """A repository from before roots gets its first root: the index in place must be signed by the new root's
    online keys (else every client following the root would refuse it until a re-sign). Raises UsageError."""
    try:
        data, sig = (repo / store.INDEX).read_bytes(), (repo / store.INDEX_SIG).read_bytes()
    except OSError as exc:
        raise store.io_error("read", repo / store.INDEX, exc) from None
    with RootVerifier(first) as verifier:
        try:
            verifier.verify(data, sig, "index.json.asc")
        except SignatureError as exc:
            raise UsageError("root", f"the index in place does not verify with the online keys of the new root "
                                     f"({exc.message}): name the key that signs the index as an online key") \
                from None
    from tmplbuild.repo import index as idx

    repo_id = idx.parse(data).repo_id
    if repo_id != first.repo_id:
        # Clients following the root pin its repo_id: an index under another one would be refused by all of them.
        raise UsageError("root", f"the new root names repo_id {first.repo_id!r}, the index in place {repo_id!r}: "
                                 "use the repository's id (root init --repo-id)")
