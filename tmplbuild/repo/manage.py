"""`tmplbuild repo init|verify|prune|resign`: create, audit and maintain a repository directory."""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from tmplbuild.errors import AuthenticityError, UsageError
from tmplbuild.files import hash_file
from tmplbuild.repo import accept
from tmplbuild.repo.converge import converge
from tmplbuild.repo import index as idx
from tmplbuild.repo import store, sums
from tmplbuild.sign import Signer, Verifier, export_public


def init(root: Path, signer: Signer, gnupghome: Path, repo_id: str, expires_in: int) -> idx.Index:
    """A new, empty, signed repository (index version 1) with the signing key's public half in keys/.
    Raises UsageError when root already holds a repository."""
    idx.check_lifetime(expires_in)
    if (root / store.INDEX).exists():
        raise UsageError("repo init", f"{root} already holds a repository")
    if not idx.NAME.match(repo_id):
        raise UsageError("repo init", f"repo id {repo_id!r}: expected lowercase letters, digits and . + -")
    (root / "keys").mkdir(parents=True, exist_ok=True)
    store.write_durable(root / "keys" / f"{signer.fingerprint}.asc", export_public(signer.fingerprint, gnupghome,
                                                                                armored=True))
    now = time.time()
    first = idx.Index(repo_id=repo_id, version=1, generated=idx.stamp(now), expires=idx.stamp(now + expires_in))
    with store.locked(root):
        keys = store.read_keys(root)
        _sign_and_write(root, first, signer, keys)
    return first


def resign(root: Path, signer: Signer, expires_in: int) -> idx.Index:
    """The same catalogue, version + 1, a fresh expiry: what CI runs when nothing changed. Leftovers of an
    interrupted publish or prune go first (converge), SHA256SUMS pairs that match no index re-signed."""
    with store.locked(root):
        keys = store.read_keys(root)
        with Verifier(keys.public_keys, keys.fingerprints) as verifier:
            current, _ = store.load_index(root, verifier)
            converge(root, current, write_sums=lambda d, entries: _write_sums(d, entries, signer, verifier))
        new = current.successor(current.templates, expires_in)
        _sign_and_write(root, new, signer, keys)
        return new


def prune(root: Path, keep: int, signer: Signer, expires_in: int) -> tuple[idx.Index, list[idx.Entry]]:
    """Keep the newest `keep` versions of each template and architecture. The new index is written before
    any file is deleted, so no client is ever sent to a file that is gone."""
    if keep < 1:
        raise UsageError("repo prune", f"--keep {keep}: expected at least 1")
    with store.locked(root):
        keys = store.read_keys(root)
        with Verifier(keys.public_keys, keys.fingerprints) as verifier:
            current, _ = store.load_index(root, verifier)
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
        new = current.successor(tuple(kept), expires_in)
        _sign_and_write(root, new, signer, keys)
        with Verifier(keys.public_keys, keys.fingerprints) as verifier:
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
        return new, removed


def _write_sums(directory: Path, entries: list[idx.Entry], signer: Signer, verifier: Verifier) -> None:
    text = sums.render(sums.expected(entries))
    sig = signer.sign(text, armored=False)
    verifier.verify(text, sig)
    for name, content in ((sums.SIG, sig), (sums.NAME, text)):
        tmp = directory / f".{name}.part"
        store.write_durable(tmp, content)
        os.replace(tmp, directory / name)


def _sign_and_write(root: Path, index: idx.Index, signer: Signer, keys: store.RepoKeys) -> None:
    data = index.to_bytes()
    sig = signer.sign(data, armored=True)
    with Verifier(keys.public_keys, keys.fingerprints) as verifier:
        verifier.verify(data, sig)  # sign, verify, then publish
    store.write_index(root, data, sig)


UNLISTED = "served but not listed in the index"


def repair(root: Path, public_keys: bytes, pinned: tuple[str, ...]) -> list[str]:
    """`repo verify --repair`: under the repository lock, finish or discard an interrupted index swap, remove
    upload directories no server process holds, then converge the served tree on the index (verified with
    `public_keys`/`pinned`; nothing is touched when it does not verify): unlisted files under templates/ and
    empty directories are deleted, SHA256SUMS pairs put back from a publisher's backup, anything else unlisted
    moved to .quarantine/. Returns what was done, one line each. Raises UsageError, AuthenticityError (the
    index), LocalIOError (lock)."""
    with store.locked(root) as done:
        with Verifier(public_keys, pinned) as verifier:
            current, _ = store.load_index(root, verifier)
        try:
            from repo_server.safety import sweep_uploads
        except ImportError:  # pragma: no cover - the server is part of the same distribution
            pass
        else:
            done = done + [f"removed {name}/, left by an interrupted upload" for name in sweep_uploads(root)]
        return done + converge(root, current, repair=True)


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


def audit(root: Path, public_keys: bytes, pinned: tuple[str, ...], now: float | None = None) -> list[Finding]:
    """Every finding in the repository, one line each; empty when all is well. Checks the index signature
    and schema, freshness, that every listed file exists with its signed size and hashes and a good .asc,
    that each directory's SHA256SUMS pair verifies and agrees with the index, and that nothing unlisted is
    served."""
    findings: list[Finding] = []
    now = time.time() if now is None else now
    with Verifier(public_keys, pinned) as verifier:
        try:
            current, _ = store.load_index(root, verifier)
        except (AuthenticityError, UsageError) as exc:
            return [Finding(f"{store.INDEX}: {exc}")]
        if accept.is_expired(current, now):  # the one boundary: now >= expires
            findings.append(Finding(f"{store.INDEX}: expired at {current.expires}", Finding.FRESHNESS))
        if accept.is_from_the_future(current, now):
            findings.append(Finding(f"{store.INDEX}: generated {current.generated}, more than "
                                    f"{accept.MAX_CLOCK_SKEW} s ahead of this clock", Finding.FRESHNESS))
        allowed = {store.INDEX, store.INDEX_SIG} | {f"keys/{f}.asc" for f in store.read_keys(root).fingerprints}
        by_dir: dict[str, list[idx.Entry]] = {}
        for e in current.templates:
            by_dir.setdefault(e.directory, []).append(e)
            for ref in (*e.files, e.manifest):
                allowed |= {ref.path, ref.path + ".asc"}
                findings += map(Finding, _check_file(root, ref, verifier))
        for directory, entries in by_dir.items():
            allowed |= {f"{directory}/{sums.NAME}", f"{directory}/{sums.SIG}"}
            findings += map(Finding, _check_sums(root, directory, entries, verifier))
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))  # dot-paths are never served
            for name in sorted(filenames):
                rel = os.path.relpath(os.path.join(dirpath, name), root)
                if not name.startswith(".") and rel not in allowed:
                    findings.append(Finding(f"{rel}: {UNLISTED}", Finding.UNLISTED))
    return findings


def _check_file(root: Path, ref: idx.FileRef, verifier: Verifier) -> list[str]:
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


def _check_sums(root: Path, directory: str, entries: list[idx.Entry], verifier: Verifier) -> list[str]:
    try:
        text = (root / directory / sums.NAME).read_bytes()
        verifier.verify(text, (root / directory / sums.SIG).read_bytes())
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
