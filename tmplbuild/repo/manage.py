"""`tmplbuild repo init|verify|prune|resign|remove`: create, audit and maintain a repository directory.

Every verb takes the repository's trust from tmplbuild.repo.chain (its root chain, or keys/ for a repository from
before roots): the index in place is read with `base_verifier()`, what is signed anew must pass
`index_verifier()`, and a signer the newest root does not name as online, or an expired newest root, is refused
before anything is written (`writer_trust`). An index in place signed under an earlier root by a key the newest
root no longer names (a stolen online key, rotated out) is built upon only by `resign(carry_over=True)` and
`remove(carry_over=True)`: publish and prune refuse it (`refuse_carried_over`)."""
from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Iterable
from pathlib import Path

from tmplbuild.errors import AuthenticityError, FreshnessError, UsageError
from tmplbuild.files import hash_file
from tmplbuild.repo import accept
from tmplbuild.repo import chain
from tmplbuild.repo import root as rootdoc
from tmplbuild.repo.converge import converge
from tmplbuild.repo import index as idx
from tmplbuild.repo import lookaside
from tmplbuild.repo import store, sums
from tmplbuild.sign import Signer, Verifier, export_public


def writer_trust(root: Path, signer: Signer, legacy_key_check: bool = False) -> chain.RepoTrust:
    """The repository's trust, for one about to sign with `signer`: with a root chain, the signer must be an
    online key of the newest root, and that root not expired. Call before anything is written. Raises
    AuthenticityError ("signer", a broken chain), FreshnessError ("root expired"), UsageError (no keys; with
    `legacy_key_check`, a repository without roots whose keys/ does not hold the signer)."""
    trust = chain.repo_trust(root)
    if trust.root is None:
        assert trust.keys is not None
        if legacy_key_check and signer.fingerprint not in trust.keys.fingerprints:
            raise UsageError("key", f"{signer.fingerprint} is not one of the repository's keys "
                                    f"({', '.join(trust.keys.fingerprints)})")
    else:
        trust.check_signer(signer.fingerprint)
        trust.check_fresh()
    return trust


def refuse_carried_over(root: Path, trust: chain.RepoTrust, base, verb: str) -> None:
    """After `base` (trust.base_verifier()) accepted the index in place: refuse to build on an index signed by a
    key the newest root no longer names. Raises AuthenticityError("index signer")."""
    if trust.carried_over(base) is not None:
        then = base.last_root.version if getattr(base, "last_root", None) is not None else "?"
        raise AuthenticityError("index signer", (
            f"the index in place was signed under root {then} by a key root {trust.root.version} no longer names "
            f"(online keys: {', '.join(trust.root.online.keys)}); {verb} refused: review the index (tmplbuild "
            f"repo verify {root}) and run `tmplbuild repo resign {root} --carry-over` (or `tmplbuild repo "
            f"remove ... --carry-over` for what should not be there) first"))


def _carry_over(root: Path, trust: chain.RepoTrust, base, carry_over: bool, verb: str,
                notes: list[str] | None) -> bool:
    """resign/remove: an index in place signed by a key the newest root dropped needs `carry_over`; the warning
    line goes to `notes`. Returns whether it is carried over. Raises AuthenticityError("index signer")."""
    line = trust.carried_over(base)
    if line is None:
        return False
    if not carry_over:
        refuse_carried_over(root, trust, base, verb)
    if notes is not None:
        notes.append(line)
    return True


def init(root: Path, signer: Signer, gnupghome: Path, repo_id: str, expires_in: int) -> idx.Index:
    """A new, empty, signed repository (index version 1) with the signing key's public half in keys/. A directory
    that already holds a root (root/1.root.json, installed first) keeps it: the signer must then be one of its
    online keys, whose public halves the root put in keys/. Raises UsageError when root already holds a
    repository, AuthenticityError / FreshnessError as `writer_trust`."""
    idx.check_lifetime(expires_in)
    if (root / store.INDEX).exists():
        raise UsageError("repo init", f"{root} already holds a repository")
    if not idx.NAME.match(repo_id):
        raise UsageError("repo init", f"repo id {repo_id!r}: expected lowercase letters, digits and . + -")
    if not (root / rootdoc.path(1)).is_file():
        (root / "keys").mkdir(parents=True, exist_ok=True)
        store.write_durable(root / "keys" / f"{signer.fingerprint}.asc",
                            export_public(signer.fingerprint, gnupghome, armored=True))
    now = time.time()
    first = idx.Index(repo_id=repo_id, version=1, generated=idx.stamp(now), expires=idx.stamp(now + expires_in))
    with store.locked(root):
        trust = writer_trust(root, signer)
        _sign_and_write(root, first, signer, trust)
    return first


def resign(root: Path, signer: Signer, expires_in: int, carry_over: bool = False,
           notes: list[str] | None = None) -> idx.Index:
    """The same catalogue, version + 1, a fresh expiry: what CI runs when nothing changed. Leftovers of an
    interrupted publish or prune go first (converge), SHA256SUMS pairs that match no index re-signed.

    An index in place signed by a key the newest root no longer names is refused unless `carry_over`: then its
    entries are re-signed by `signer` (the index, and every .asc and SHA256SUMS.gpg the newest root's online
    keys do not verify), and the warning line is appended to `notes`. Raises UsageError, AuthenticityError
    ("signer", "index signer", signatures), FreshnessError ("root expired"), LocalIOError."""
    with store.locked(root):
        trust = writer_trust(root, signer)
        with trust.base_verifier() as base, trust.index_verifier() as verifier:
            current, _ = store.load_index(root, base)
            carried = _carry_over(root, trust, base, carry_over, "resign", notes)
            converge(root, current, write_sums=lambda d, entries: _write_sums(d, entries, signer, verifier))
            if carried:
                _resign_files(root, current.templates, signer, verifier, notes)
            new = current.successor(current.templates, expires_in)
            _sign_and_write(root, new, signer, trust, verifier)
        return new


def prune(root: Path, keep: int, signer: Signer, expires_in: int) -> tuple[idx.Index, list[idx.Entry]]:
    """Keep the newest `keep` versions of each template and architecture. The new index is written before
    any file is deleted, so no client is ever sent to a file that is gone. Raises UsageError,
    AuthenticityError ("signer", "index signer": the index in place needs `repo resign --carry-over` first),
    FreshnessError ("root expired"), LocalIOError."""
    if keep < 1:
        raise UsageError("repo prune", f"--keep {keep}: expected at least 1")
    with store.locked(root):
        trust = writer_trust(root, signer)
        with trust.base_verifier() as base, trust.index_verifier() as verifier:
            current, _ = store.load_index(root, base)
            refuse_carried_over(root, trust, base, "prune")
            converge(root, current, write_sums=lambda d, entries: _write_sums(d, entries, signer, verifier))
            groups: dict[tuple[str, str], list[idx.Entry]] = {}
            for e in current.templates:
                groups.setdefault((e.name, e.arch), []).append(e)
            kept: list[idx.Entry] = []
            removed: list[idx.Entry] = []
            for entries in groups.values():
                entries.sort(key=lambda e: (e.created, e.version), reverse=True)
                kept += entries[:keep]
                removed += entries[keep:]
            if not removed:
                return current, []
            return _drop(root, current, kept, removed, signer, trust, verifier, expires_in), removed


def remove(root: Path, name: str, version: str, arch: str | None, signer: Signer, expires_in: int,
           carry_over: bool = False, notes: list[str] | None = None) -> tuple[idx.Index, list[idx.Entry]]:
    """Drop the entries of template `name` `version` (one architecture, or all), delete their files and re-sign
    (index version + 1): how a maintainer takes out what should not be there, e.g. what a thief published with a
    stolen online key before a new root dropped it. The new index is written before any file is deleted. An
    index in place signed by a key the newest root no longer names needs `carry_over` (as `resign`, whose
    re-signing of the remaining files it does too); the warning line goes to `notes`. Raises UsageError (no such
    entry), AuthenticityError, FreshnessError, LocalIOError."""
    with store.locked(root):
        trust = writer_trust(root, signer)
        with trust.base_verifier() as base, trust.index_verifier() as verifier:
            current, _ = store.load_index(root, base)
            removed = [e for e in current.templates
                       if e.name == name and e.version == version and (arch is None or e.arch == arch)]
            if not removed:
                listed = sorted({f"{e.name} {e.version} {e.arch}" for e in current.templates if e.name == name})
                raise UsageError("repo remove", f"{name} {version}{' ' + arch if arch else ''}: not in the index "
                                                f"(version {current.version}; listed for {name}: "
                                                f"{', '.join(listed) or 'none'})")
            carried = _carry_over(root, trust, base, carry_over, "remove", notes)
            converge(root, current, write_sums=lambda d, entries: _write_sums(d, entries, signer, verifier))
            kept = [e for e in current.templates if e not in removed]
            if carried:  # what stays; the SHA256SUMS pairs of the directories losing entries are _drop's
                _resign_files(root, kept, signer, verifier, notes, skip={e.directory for e in removed})
            return _drop(root, current, kept, removed, signer, trust, verifier, expires_in), removed


def _drop(root: Path, current: idx.Index, kept: list[idx.Entry], removed: list[idx.Entry], signer: Signer,
          trust: chain.RepoTrust, verifier, expires_in: int) -> idx.Index:
    """Sign and write the index listing `kept`, then delete the files of `removed` (and their directories when
    nothing is left in them), re-signing the SHA256SUMS pair of each directory that keeps entries."""
    new = current.successor(tuple(kept), expires_in)
    dropped_signatures = [s for e in removed for s in lookaside.signatures_of(root, e) or ()]
    _sign_and_write(root, new, signer, trust, verifier)
    for sig in dropped_signatures:  # the lookaside files of the images the index no longer names
        (root / sig.path).unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            (root / sig.path).parent.rmdir()
    for directory in sorted({e.directory for e in removed}):
        remaining = [e for e in kept if e.directory == directory]
        if not remaining:
            shutil.rmtree(root / directory, ignore_errors=True)
            continue
        for e in removed:
            if e.directory == directory:
                for ref in (*e.files, e.manifest):
                    for p in (root / ref.path, root / (ref.path + ".asc")):
                        p.unlink(missing_ok=True)
        _write_sums(root / directory, remaining, signer, verifier)
    for parent in {(root / e.directory).parent for e in removed}:
        if parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()
    return new


def _resign_files(root: Path, entries: Iterable[idx.Entry], signer: Signer, verifier, notes: list[str] | None,
                  skip: frozenset[str] | set[str] = frozenset()) -> None:
    """Carrying an index over: every listed file's .asc and every directory's SHA256SUMS.gpg that `verifier` (the
    newest root's online keys) does not accept is signed again by `signer`, verified, then renamed into place.
    Content is not re-hashed here: `repo verify` checks it. The SHA256SUMS pairs of directories in `skip` are left
    to the caller. The OCI images' lookaside signatures are carried over the same way (tmplbuild.repo.lookaside).
    Raises AuthenticityError, LocalIOError."""
    entries = list(entries)
    count = 0
    by_dir: dict[str, list[idx.Entry]] = {}
    for e in entries:
        by_dir.setdefault(e.directory, []).append(e)
        for ref in (*e.files, e.manifest):
            path, asc = root / ref.path, root / (ref.path + ".asc")
            try:
                verifier.verify_file(path, asc.read_bytes())
                continue
            except (AuthenticityError, FileNotFoundError):
                pass
            sig = signer.sign_file(path, armored=True)
            verifier.verify_file(path, sig)
            tmp = asc.with_name(f".{asc.name}.part")
            store.write_durable(tmp, sig)
            os.replace(tmp, asc)
            count += 1
    for directory, listed in sorted(by_dir.items()):
        d = root / directory
        if directory in skip:
            continue
        try:
            verifier.verify_file(d / sums.NAME, (d / sums.SIG).read_bytes())
            continue
        except (AuthenticityError, FileNotFoundError):
            pass
        _write_sums(d, listed, signer, verifier)
        count += 1
    images = lookaside.resign(root, entries, signer, verifier)  # the OCI images' lookaside
    if (count or images) and notes is not None:
        notes.append(f"re-signed {count} file signature(s) (.asc, SHA256SUMS.gpg)"
                     + (f" and {images} image signature(s) (sigstore/)" if images else "") + f" with {signer.fingerprint}")


def _write_sums(directory: Path, entries: list[idx.Entry], signer: Signer, verifier) -> None:
    """Sign and write a directory's SHA256SUMS pair, the signature verified over the text as written (one
    signature, as gpgv and systemd-pull read it: verify_file)."""
    text = sums.render(sums.expected(entries))
    sig = signer.sign(text, armored=False)
    tmps = []
    try:
        for name, content in ((sums.NAME, text), (sums.SIG, sig)):
            tmps.append(directory / f".{name}.part")
            store.write_durable(tmps[-1], content)
        verifier.verify_file(tmps[0], sig)
        for name in (sums.SIG, sums.NAME):  # the signature first
            os.replace(directory / f".{name}.part", directory / name)
    finally:
        for tmp in tmps:
            tmp.unlink(missing_ok=True)


def _sign_and_write(root: Path, index: idx.Index, signer: Signer, trust: chain.RepoTrust, verifier=None) -> None:
    """Sign `index`, verify it as clients will (trust.index_verifier(): a threshold of the newest root's online
    keys, or keys/), then swap it in."""
    data = index.to_bytes()
    sig = signer.sign(data, armored=True)
    if verifier is None:
        with trust.index_verifier() as own:
            own.verify(data, sig)  # sign, verify, then publish
    else:
        verifier.verify(data, sig)
    store.write_index(root, data, sig)


UNLISTED = "served but not listed in the index"


def repair(root: Path, public_keys: bytes | None = None, pinned: tuple[str, ...] = ()) -> list[str]:
    """`repo verify --repair`: under the repository lock, finish or discard an interrupted index swap, remove
    upload directories no server process holds, then converge the served tree on the index (verified with
    `public_keys`/`pinned` when given, else with the repository's own trust as a publisher reads it:
    chain.repo_trust(root).base_verifier(); nothing is touched when it does not verify): unlisted files under
    templates/ and empty directories are deleted, SHA256SUMS pairs put back from a publisher's backup, anything
    else unlisted moved to .quarantine/ (root/ keeps its root documents, keys/ its keys). Returns what was done,
    one line each. Raises UsageError, AuthenticityError (the index, the root chain), FreshnessError (the root
    chain), LocalIOError (lock)."""
    with store.locked(root) as done:
        with _verifier_for(root, public_keys, pinned) as verifier:
            current, _ = store.load_index(root, verifier)
        try:
            from repo_server.safety import sweep_uploads
        except ImportError:  # pragma: no cover - the server is part of the same distribution
            pass
        else:
            done = done + [f"removed {name}/, left by an interrupted upload" for name in sweep_uploads(root)]
        return done + converge(root, current, repair=True)


def _verifier_for(root: Path, public_keys: bytes | None, pinned: tuple[str, ...]):
    if public_keys is not None:
        return Verifier(public_keys, pinned)
    return chain.repo_trust(root).base_verifier()


def repair_hint(root: Path, findings: list[Finding]) -> str | None:
    """The line `repo verify` adds when --repair would fix some of its findings."""
    if any(f.kind == Finding.UNLISTED for f in findings):
        return (f"files are served that the signed index does not list (left by an interrupted publish?): "
                f"`tmplbuild repo verify --repair {root}` removes them")
    return None


class Finding(str):
    """One line of `repo verify`, with its kind: FRESHNESS (exit 4 when every finding is one), UNLISTED (what
    `--repair` removes) or AUTHENTICITY (everything else: exit 3). A str, so it prints and compares as its line."""

    FRESHNESS, UNLISTED, AUTHENTICITY = "freshness", "unlisted", "authenticity"
    kind: str

    def __new__(cls, line: str, kind: str = "authenticity") -> Finding:
        self = super().__new__(cls, line)
        self.kind = kind
        return self


def audit(root: Path, public_keys: bytes | None = None, pinned: tuple[str, ...] = (), now: float | None = None,
          root_pins: tuple[str, ...] = ()) -> list[Finding]:
    """Every finding in the repository, one line each; empty when all is well. Checks the root chain (when the
    repository has root/: every root against the one before, the first self-signed, or with `root_pins` anchored
    on those root fingerprints; the newest not expired), the index signature (a threshold of the newest root's
    online keys; an index still signed by a key a later root dropped is a finding) and schema, freshness, that
    every listed file exists with its signed size and hashes and a good .asc, that each directory's SHA256SUMS
    pair verifies and agrees with the index, and that nothing unlisted is served.

    `public_keys`/`pinned` (repo verify --key): verify the index and files with those keys instead, as for a
    repository from before roots. Raises nothing for what it finds; UsageError for a repository without keys."""
    findings: list[Finding] = []
    now = time.time() if now is None else now
    allowed: set[str] = set()
    trust: chain.RepoTrust | None = None
    if public_keys is None:
        try:
            if root_pins:
                anchored = rootdoc.anchor_and_walk(root_pins, chain.local_fetch(root), limit=10**6)
                trust = chain.RepoTrust(chain=anchored)
            else:
                trust = chain.repo_trust(root)
        except (AuthenticityError, FreshnessError) as exc:  # a broken chain: nothing after it can be trusted
            return [Finding(f"{rootdoc.DIRECTORY}/: {exc}")]
        if trust.root is not None:
            allowed |= {p for v in range(1, trust.root.version + 1)
                        for p in (rootdoc.path(v), rootdoc.path(v) + ".asc")}
            if rootdoc.is_expired(trust.root, now):
                findings.append(Finding(f"{rootdoc.path(trust.root.version)}: {trust.root.describe()}: expired, "
                                        "clients refuse the repository until the root key holders sign a new root",
                                        Finding.FRESHNESS))
    else:
        allowed |= rootdoc.files_in(root)
    with (Verifier(public_keys, pinned) if trust is None else trust.index_verifier()) as verifier:
        try:
            current, _ = store.load_index(root, verifier)
        except (AuthenticityError, UsageError) as exc:
            if trust is None or trust.root is None or not isinstance(exc, AuthenticityError):
                return findings + [Finding(f"{store.INDEX}: {exc}")]
            # Signed under an earlier root, by a key the newest one dropped? One finding for it; its files (signed
            # with the same key) are then checked under the chain, as the index was, not one finding each.
            with trust.base_verifier() as base:
                try:
                    current, _ = store.load_index(root, base)
                except AuthenticityError:
                    return findings + [Finding(f"{store.INDEX}: {exc}")]
                assert base.last_root is not None and trust.root is not None
                findings.append(Finding(
                    f"{store.INDEX}: signed under root {base.last_root.version} by a key root {trust.root.version} "
                    f"no longer names (online keys: {', '.join(trust.root.online.keys)}): clients refuse it; "
                    f"review it and run `tmplbuild repo resign {root} --carry-over` ({exc.message})"))
                return findings + _audit_index(root, current, base, allowed, now)
        findings += _audit_index(root, current, verifier, allowed, now)
    return findings


def _audit_index(root: Path, current: idx.Index, verifier, allowed: set[str], now: float) -> list[Finding]:
    findings: list[Finding] = []
    if accept.is_expired(current, now):  # the one boundary: now >= expires
        findings.append(Finding(f"{store.INDEX}: expired at {current.expires}", Finding.FRESHNESS))
    if accept.is_from_the_future(current, now):
        findings.append(Finding(f"{store.INDEX}: generated {current.generated}, more than "
                                f"{accept.MAX_CLOCK_SKEW} s ahead of this clock", Finding.FRESHNESS))
    allowed = allowed | {store.INDEX, store.INDEX_SIG} | {f"keys/{p.name}" for p in store.key_files(root)}
    by_dir: dict[str, list[idx.Entry]] = {}
    for e in current.templates:
        by_dir.setdefault(e.directory, []).append(e)
        for ref in (*e.files, e.manifest):
            allowed |= {ref.path, ref.path + ".asc"}
            findings += map(Finding, _check_file(root, ref, verifier))
    for directory, entries in by_dir.items():
        allowed |= {f"{directory}/{sums.NAME}", f"{directory}/{sums.SIG}"}
        findings += map(Finding, _check_sums(root, directory, entries, verifier))
    signatures = lookaside.listed(root, current.templates) or {}  # None: a manifest finding above says why
    allowed |= set(signatures)
    findings += map(Finding, lookaside.problems(root, signatures, verifier))
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))  # dot-paths are never served
        for name in sorted(filenames):
            rel = os.path.relpath(os.path.join(dirpath, name), root)
            if not name.startswith(".") and rel not in allowed:
                findings.append(Finding(f"{rel}: {UNLISTED}", Finding.UNLISTED))
    return findings


def _check_file(root: Path, ref: idx.FileRef, verifier) -> list[str]:
    path = root / ref.path
    if not path.is_file():
        return [f"{ref.path}: listed in the index but missing"]
    problem = accept.file_problem(ref, *hash_file(path))
    out = [problem.message] if problem else []
    try:
        verifier.verify_file(path, (root / (ref.path + ".asc")).read_bytes())
    except FileNotFoundError:
        out.append(f"{ref.path}.asc: missing")
    except AuthenticityError as exc:
        out.append(f"{ref.path}.asc: {exc}")
    return out


def _check_sums(root: Path, directory: str, entries: list[idx.Entry], verifier) -> list[str]:
    try:
        text = (root / directory / sums.NAME).read_bytes()
        verifier.verify_file(root / directory / sums.NAME, (root / directory / sums.SIG).read_bytes())
    except FileNotFoundError as exc:
        return [f"{directory}/{Path(exc.filename).name}: missing"]
    except AuthenticityError as exc:
        return [f"{directory}/{sums.SIG}: {exc}"]
    problem = sums.difference(text, sums.expected(entries))
    return [f"{directory}/{sums.NAME}: does not match the index ({problem})"] if problem else []


def fingerprints_in(key_data: bytes) -> list[str]:
    """Primary key fingerprints in a public key file, read with gpg --show-keys in a throwaway home (no
    keyring is touched). Raises UsageError when there are none."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory(prefix="tmplbuild-show-") as home:
        proc = subprocess.run(["gpg", "--homedir", home, "--batch", "--with-colons", "--show-keys"],
                              input=key_data, capture_output=True)
    fprs, primary = [], False
    for line in proc.stdout.decode(errors="replace").splitlines():
        fields = line.split(":")
        if fields[0] in ("pub", "sub"):
            primary = fields[0] == "pub"
        elif fields[0] == "fpr" and primary:
            fprs.append(fields[9])
            primary = False
    if not fprs:
        raise UsageError("key", "no public key found in the key file")
    return fprs
