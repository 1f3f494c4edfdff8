"""POST /api/v1/publish: receive a publisher's upload, check it the way a client would, then put it in place.

The body is an uncompressed tar of regular files with repository-relative paths: index.json, index.json.asc,
files under templates/<name>/<version>/ and the OCI images' lookaside signatures under sigstore/ (each listed with
its sha256 by an uploaded manifest of the new index). It is streamed, member by member, into REPO/.upload-<random>/ (a
dot-directory: never served, swept at start-up if a crash left it), hashing each file as it is written.

Why a token is not enough: the bearer token only lets someone *send* an upload. What gets published is decided
by the signatures, under the repository's trust (tmplbuild.repo.chain): the new index must be signed by a
threshold of the online keys its newest root names (a repository from before roots: one of its pinned keys,
keys/<FPR>.asc), every new file must match the hashes in that signed index and carry a good signature of its
own by one of those keys; the newest root must not be expired. So a stolen token alone cannot publish anything a
client accepts: without the private signing key (which never comes near this server) the upload is refused with
422. The index in place, which the upload must succeed, is read as a publisher reads it (signed under the newest
root or an earlier one of the chain).

A root upload (a tar of root/<N>.root.json and root/<N>.root.json.asc only) is checked by chain.install, TUF's
successor rule against the newest root; it answers {"root": N}. Root keys never come near the server either:
it only checks what their holders signed elsewhere.

Nothing is moved into the served tree before every check has passed, and the index pair is swapped in last
through store.write_index (journaled), under the repository lock: a server killed at any point leaves the
previous index and everything it lists intact. A publish that fails after its files moved in (a full disk while
writing the index: 507) takes them out again at once; one killed there leaves them to the next publish or the
server's next start, which converge the tree on the signed index (tmplbuild.repo.converge) under the same
lock. A full disk is 507 Insufficient Storage, whichever write hit it, with nothing of the upload left behind."""
from __future__ import annotations

import errno
import hashlib
import os
import secrets
import shutil
import stat
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from tmplbuild.files import hash_file
from tmplbuild.errors import AuthenticityError, FreshnessError, LocalIOError, TmplbuildError, UsageError
from tmplbuild.oci import record, simplesign
from tmplbuild.repo import accept
from tmplbuild.repo import chain
from tmplbuild.repo import converge
from tmplbuild.repo import lookaside
from tmplbuild.repo import root as rootdoc
from tmplbuild.repo import index as idx
from tmplbuild.repo import store, sums

from repo_server import safety
from repo_server.verified import IndexCache, IndexUnavailable

CHUNK = 1 << 20
TAR_BUFSIZE = 64 << 10  # how much tarfile asks of the request stream at a time (gunicorn waits for all of it)
MAX_MEMBERS = 10_000
MAX_SMALL_FILE = 64 << 20  # index.json, signatures, SHA256SUMS: read into memory, so capped
FUTURE_SKEW = accept.MAX_CLOCK_SKEW  # seconds a new index's `generated` may lie ahead of the server's clock
SUMS, SUMS_SIG = sums.NAME, sums.SIG


class Refused(Exception):
    """An upload answered with an HTTP error: status, one-line message, extra JSON fields."""

    def __init__(self, status: int, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.extra = extra

    def body(self) -> dict[str, Any]:
        return {"error": self.message, **self.extra}


@dataclass
class Received:
    """One extracted file: where it is in the temporary directory and what it hashed to."""

    path: Path
    size: int
    sha256: str
    sha512: str


@dataclass
class Upload:
    tmp: Path
    files: dict[str, Received] = field(default_factory=dict)  # repository-relative path -> file

    def read(self, rel: str) -> bytes:
        return self.files[rel].path.read_bytes()


class CappedReader:
    """A file-like reader that refuses to deliver more than `cap` bytes in total: the body is capped while it
    is read, whatever Content-Length said."""

    def __init__(self, stream: BinaryIO, cap: int) -> None:
        self.stream = stream
        self.cap = cap
        self.count = 0

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(CHUNK if n is None or n < 0 else n)
        self.count += len(data)
        if self.count > self.cap:
            raise Refused(413, f"upload larger than the server's limit of {self.cap} bytes")
        return data


def member_path(member: tarfile.TarInfo) -> str:
    """The repository path a tar member may be written to. Raises Refused(400)."""
    name = member.name
    if not (member.isreg() and not member.issparse()):
        kind = {tarfile.DIRTYPE: "a directory", tarfile.SYMTYPE: "a symlink", tarfile.LNKTYPE: "a hard link",
                tarfile.CHRTYPE: "a device", tarfile.BLKTYPE: "a device", tarfile.FIFOTYPE: "a fifo"}.get(
                    member.type, "not a regular file")
        raise Refused(400, f"tar member {name!r} is {kind}: the upload holds regular files only")
    if not name or name.startswith("/") or "\\" in name or "\0" in name:
        raise Refused(400, f"tar member {name!r}: absolute or malformed path")
    if any(p in ("", ".", "..") or p.startswith(".") for p in name.split("/")):
        raise Refused(400, f"tar member {name!r}: empty, '.', '..' or dot component")
    if name not in (store.INDEX, store.INDEX_SIG) and not idx.PATH.match(name) and _root_member(name) is None \
            and not record.SIGNATURE_PATH.match(name):
        raise Refused(400, f"tar member {name!r}: expected index.json, index.json.asc, "
                           f"templates/<name>/<version>/<file>, sigstore/<path>@sha256=<hex>/signature-<N>, or "
                           f"root/<N>.root.json and its .asc")
    return name


def _root_member(name: str) -> int | None:
    """The version N of a `root/<N>.root.json` or `root/<N>.root.json.asc` member path, else None."""
    directory, _, file = name.partition("/")
    m = rootdoc.FILE.match(file.removesuffix(".asc")) if directory == rootdoc.DIRECTORY else None
    return int(m.group(1)) if m else None


class _StrictInfo(tarfile.TarInfo):
    """Notes where the archive ended: tarfile's reader takes a truncated or garbled header after the first
    member for the end of the archive, which would make a cut-off upload look complete."""

    @classmethod
    def fromtarfile(cls, tar):  # type: ignore[override]
        try:
            return super().fromtarfile(tar)
        except tarfile.EOFHeaderError:  # a block of zeros: the real end-of-archive marker
            tar.tmpl_clean_end = True
            raise


def extract(stream: BinaryIO, cap: int, tmp: Path) -> Upload:
    """Stream the tar into `tmp`, checking every member first and hashing every file as it is written.
    Raises Refused (400 malformed, 413 too large)."""
    upload = Upload(tmp)
    reader = CappedReader(stream, cap)
    try:
        with tarfile.open(fileobj=reader, mode="r|", bufsize=TAR_BUFSIZE,  # type: ignore[call-overload]
                          tarinfo=_StrictInfo) as tar:
            tar.tmpl_clean_end = False
            for count, member in enumerate(tar, 1):
                if count > MAX_MEMBERS:
                    raise Refused(400, f"more than {MAX_MEMBERS} tar members")
                rel = member_path(member)
                if rel in upload.files:
                    raise Refused(400, f"tar member {rel!r} appears twice")
                src = tar.extractfile(member)
                assert src is not None  # a regular file
                upload.files[rel] = _write(src, tmp / rel, member.size, rel)
            if not tar.tmpl_clean_end:
                raise Refused(400, "the tar archive is truncated or corrupt (no end-of-archive marker after "
                                   f"{len(upload.files)} members)")
    except tarfile.TarError as exc:
        raise Refused(400, f"not a readable tar archive: {exc}") from None
    except EOFError:
        raise Refused(400, "the tar archive is truncated") from None
    if not upload.files:
        raise Refused(400, "empty upload")
    return upload


def _write(src: BinaryIO, dest: Path, expected: int, rel: str) -> Received:
    dest.parent.mkdir(parents=True, exist_ok=True)
    h256, h512, size = hashlib.sha256(), hashlib.sha512(), 0
    with open(dest, "xb") as out:
        while chunk := src.read(CHUNK):
            h256.update(chunk)
            h512.update(chunk)
            out.write(chunk)
            size += len(chunk)
        out.flush()
        os.fsync(out.fileno())  # written durably now, so the renames later need no second pass
    if size != expected:
        raise Refused(400, f"tar member {rel!r} is truncated: {size} of {expected} bytes")
    return Received(dest, size, h256.hexdigest(), h512.hexdigest())


def receive(root: Path, cache: IndexCache, stream: BinaryIO, cap: int, log) -> dict[str, Any]:
    """The whole upload: extract into REPO/.upload-<random>/, check, move into place, swap the index. Returns
    the 200 body: {"version", "added"}, or {"root"} for a root upload. Raises Refused. Always removes the
    temporary directory."""
    tmp = root / f"{safety.UPLOAD_PREFIX}{secrets.token_hex(8)}"
    try:
        tmp.mkdir(mode=0o700)
    except OSError as exc:
        if store.disk_full(exc):
            raise Refused(507, _disk_full_message(exc)) from None
        raise
    try:
        fd = safety.lock_dir(tmp)  # marks it as in use: a sweep by another process leaves it alone
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        upload = extract(stream, cap, tmp)
        return _check_and_publish(root, cache, upload, log)
    except OSError as exc:
        if store.disk_full(exc):
            raise Refused(507, _disk_full_message(exc)) from None
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        os.close(fd)


def _disk_full_message(exc: BaseException) -> str:
    code = getattr(exc, "errno", None) or errno.ENOSPC  # the strerror only: no server paths in the answer
    return (f"the server's disk is full ({os.strerror(code)}): nothing was published and nothing of the upload "
            f"was kept")


def _check_and_publish(root: Path, cache: IndexCache, upload: Upload, log) -> dict[str, Any]:
    if any(_root_member(rel) is not None for rel in upload.files):
        return _install_root(root, upload, log)
    for name in (store.INDEX, store.INDEX_SIG):
        if name not in upload.files:
            raise Refused(400, f"the upload has no {name}: every upload carries the new signed index pair")
    small = [rel for rel in upload.files if not _is_data(rel)]
    for rel in small:
        if upload.files[rel].size > MAX_SMALL_FILE:
            raise Refused(422, f"{rel}: {upload.files[rel].size} bytes, more than {MAX_SMALL_FILE} for an "
                               f"index, signature or SHA256SUMS file")
    data, sig = upload.read(store.INDEX), upload.read(store.INDEX_SIG)
    trust = _trust(root)
    try:
        trust.check_fresh()  # an expired newest root: every client refuses whatever is signed under it
    except FreshnessError as exc:
        raise Refused(422, f"{exc}: nothing can be published until then") from None
    with trust.index_verifier() as verifier, trust.base_verifier() as base:
        # 1. The new index: signed by a threshold of the newest root's online keys (a repository without roots:
        # one of its pinned keys) over these exact bytes, then schema, then repo_id.
        try:
            verifier.verify(data, sig)
        except AuthenticityError as exc:
            raise Refused(422, f"index.json.asc: {exc}") from None
        try:
            new = idx.parse(data)
        except AuthenticityError as exc:
            raise Refused(422, f"index.json: {exc}") from None
        try:
            current = cache.get().index
        except IndexUnavailable as exc:
            raise Refused(503, f"the current index is unusable, so no upload can be checked against it: {exc}")
        if new.repo_id != current.repo_id:
            raise Refused(422, f"index.json: repo_id {new.repo_id!r}, expected {current.repo_id!r}")

        # Nothing that looks like a private key is let into the served tree, signed or not.
        keys_found = safety.private_key_findings(upload.tmp)
        if keys_found:
            raise Refused(422, f"{keys_found[0]}: private key material; the server serves public keys only")

        # 2. The slow checks that depend only on the upload and the new signed index (hashing was done while
        # extracting; gpg reads each uploaded file once more for its .asc) run before the lock, so a 2 GiB
        # upload does not hold up other publishers. Their verdicts are reported in protocol order below.
        listed = {ref.path: ref for e in new.templates for ref in (*e.files, e.manifest)}
        problems = _upload_checks(upload, new, listed, verifier)

        try:
            with store.locked(root):
                # A root installed since the trust was read (chain.install takes this lock) may have dropped the
                # key that signed this upload: check it again against the new root.
                newest = trust.root.version if trust.root is not None else 0
                if (root / rootdoc.path(newest + 1)).exists():
                    raise Refused(409, f"root {newest + 1} was installed while the upload was checked: upload it "
                                       f"again, signed by an online key of the newest root")
                # 3. Under the lock: the version against the index as it is now (not the cached one), read as a
                # publisher reads it (signed under the newest root, or under an earlier one of its chain).
                try:
                    locked_current, _ = store.load_index(root, base)
                except TmplbuildError as exc:
                    raise Refused(503, f"the current index does not verify: {exc}") from None
                # What an earlier publish moved in but never listed (it died, or the disk filled) goes first.
                for line in converge.converge(root, locked_current):
                    log.warning("publish: %s, left by an interrupted publish", line)
                if new.repo_id != locked_current.repo_id:
                    raise Refused(422, f"index.json: repo_id {new.repo_id!r}, expected "
                                       f"{locked_current.repo_id!r}")
                if not accept.is_successor(locked_current, new):
                    raise Refused(409, f"index.json: version {new.version}, expected "
                                       f"{locked_current.version + 1} (current + 1): fetch the current index, "
                                       f"add to it and sign again", current_version=locked_current.version)
                now = time.time()  # what every client would refuse next
                if accept.is_expired(new, now):  # the one boundary: now >= expires
                    raise Refused(422, f"index.json: expired at {new.expires}")
                if accept.is_from_the_future(new, now, FUTURE_SKEW):
                    raise Refused(422, f"index.json: generated {new.generated}, in the future")
                # 4. Every listed file, uploaded or already served, with its signed size and hashes; then the
                # per-file signatures; then the SHA256SUMS pairs.
                old = {ref.path: ref for e in locked_current.templates for ref in (*e.files, e.manifest)}
                _check_listed(root, upload, listed, old, problems.get("files"))
                _check_unuploaded_signatures(root, upload, listed, verifier, problems.get("signatures"))
                if problems.get("sums"):
                    raise Refused(422, problems["sums"])
                # 5. Only now does anything reach the served tree. Should the index not get in, what was moved
                # is taken out again: nothing half-published stays served (no files, no empty directories).
                try:
                    added = _move_into_place(root, upload, old)
                    store.write_index(root, data, sig)
                except Exception:
                    converge.roll_back(root, base, log)
                    raise
                converge.settle(root, new)  # the SHA256SUMS backups, now that the new index lists the new pairs
        except LocalIOError as exc:
            if store.disk_full(exc):
                raise Refused(507, _disk_full_message(exc)) from None
            raise Refused(503, str(exc)) from None
    log.info("publish: index version %d in place (%d files added)", new.version, len(added))
    return {"version": new.version, "added": added}


def _trust(root: Path) -> chain.RepoTrust:
    """The repository's trust (its root chain, or keys/). Raises Refused(503) when it has neither or its chain
    does not verify: no upload can be checked then."""
    try:
        return chain.repo_trust(root)
    except UsageError as exc:
        raise Refused(503, f"the repository has no pinned keys: {exc}") from None
    except TmplbuildError as exc:
        raise Refused(503, f"the repository's root chain does not verify, so no upload can be checked against "
                           f"it: {exc}") from None


def _install_root(root: Path, upload: Upload, log) -> dict[str, Any]:
    """A root upload: exactly root/<N>.root.json and root/<N>.root.json.asc, checked and written by
    chain.install (TUF's successor rule against the newest root: a threshold of its root keys and of the new
    root's own). The server holds no root key: it only checks. Returns {"root": N}. Raises Refused: 400 (other
    members), 409 (a version that is not the next one), 422 (signatures, schema, an expired root), 503 / 507."""
    versions = {_root_member(rel) for rel in upload.files}
    if None in versions or len(versions) != 1:
        raise Refused(400, "a root upload holds root/<N>.root.json and root/<N>.root.json.asc only (one root, "
                           "nothing else)")
    n = versions.pop()
    assert n is not None
    doc_rel = rootdoc.path(n)
    for rel in (doc_rel, doc_rel + ".asc"):
        if rel not in upload.files:
            raise Refused(400, f"the root upload has no {rel}: a root comes with its signature file")
    for rel, cap in ((doc_rel, rootdoc.DOC_CAP), (doc_rel + ".asc", rootdoc.SIGNATURE_CAP)):
        if upload.files[rel].size > cap:
            raise Refused(422, f"{rel}: {upload.files[rel].size} bytes, more than {cap}")
    keys_found = safety.private_key_findings(upload.tmp)
    if keys_found:
        raise Refused(422, f"{keys_found[0]}: private key material; the server serves public keys only")
    data, sig = upload.read(doc_rel), upload.read(doc_rel + ".asc")
    try:
        declared = rootdoc.parse(data).version
    except AuthenticityError as exc:
        raise Refused(422, f"{doc_rel}: {exc}") from None
    if declared != n:
        raise Refused(422, f"{doc_rel}: holds root version {declared}, expected {n} (its file name)")
    try:
        new, lines = chain.install(root, data, sig, timeout=120.0)
    except rootdoc.NotNextRoot as exc:  # a rollback, or past the next version
        raise Refused(409, f"{doc_rel}: {exc}") from None
    except (FreshnessError, AuthenticityError, UsageError) as exc:
        raise Refused(422, f"{doc_rel}: {exc}") from None
    except LocalIOError as exc:
        if store.disk_full(exc):
            raise Refused(507, _disk_full_message(exc)) from None
        raise Refused(503, str(exc)) from None
    log.info("publish: %s in place (%s)", rootdoc.path(new.version), new.describe())
    for line in lines:
        log.info("publish: root %d: %s", new.version, line)
    return {"root": new.version}


def _is_data(rel: str) -> bool:
    """A template file or manifest (as opposed to the index pair, a .asc or the SHA256SUMS pair)."""
    name = rel.rsplit("/", 1)[-1]
    return rel.startswith("templates/") and not name.endswith(".asc") and name not in (SUMS, SUMS_SIG)


def _matches(got: Received, ref: idx.FileRef) -> str | None:
    problem = accept.file_problem(ref, got.size, got.sha256, got.sha512)
    return problem.message if problem else None


def _upload_checks(upload: Upload, new: idx.Index, listed: dict[str, idx.FileRef],
                   verifier) -> dict[str, str]:
    """The first problem of each kind ("files", "signatures", "sums") among what the upload carries."""
    problems: dict[str, str] = {}

    def note(kind: str, message: str) -> None:
        problems.setdefault(kind, message)

    data_dirs = set()
    for rel, got in sorted(upload.files.items()):
        if not _is_data(rel):
            continue
        data_dirs.add(rel.rsplit("/", 1)[0])
        ref = listed.get(rel)
        if ref is None:
            note("files", f"{rel}: uploaded but not listed in the new index")
            continue
        mismatch = _matches(got, ref)
        if mismatch:
            note("files", mismatch)
            continue
        asc = upload.files.get(rel + ".asc")
        if asc is None:
            note("signatures", f"{rel}.asc: missing from the upload (every uploaded file needs its signature)")
            continue
        try:
            verifier.verify_file(got.path, asc.path.read_bytes())
        except AuthenticityError as exc:
            note("signatures", f"{rel}.asc: {exc}")
    for rel in sorted(upload.files):
        name = rel.rsplit("/", 1)[-1]
        if name.endswith(".asc") and rel != store.INDEX_SIG and rel[:-4] not in listed:
            note("signatures", f"{rel}: a signature for a file the new index does not list")
    message = _check_lookaside(upload, listed, verifier)
    if message:
        note("files", message)
    for directory in sorted(data_dirs | {rel.rsplit("/", 1)[0] for rel in upload.files
                                         if rel.rsplit("/", 1)[-1] in (SUMS, SUMS_SIG)}):
        message = _check_sums(upload, directory, new, verifier, required=directory in data_dirs)
        if message:
            note("sums", message)
    return problems


def _check_lookaside(upload: Upload, listed: dict[str, idx.FileRef], verifier) -> str | None:
    """The OCI images' lookaside signatures (sigstore/...): each uploaded one listed by an uploaded manifest the
    new index lists (tmplbuild.oci.record) and a good simple signature by the online keys of what that manifest
    says it signs, as stock skopeo will check it; and each such listed one uploaded."""
    expected: dict[str, record.Signature] = {}
    for rel, got in sorted(upload.files.items()):
        ref = listed.get(rel)
        if ref is None or not rel.endswith(".manifest.json") or (got.size, got.sha256) != (ref.size, ref.sha256):
            continue  # not a listed manifest, or one the file checks refuse anyway
        try:
            rec = record.in_manifest(got.path.read_bytes())
        except ValueError as exc:
            return f"{rel}: oci: {exc}"
        if rec is not None and rec.registry is not None:
            expected.update((s.path, s) for s in rec.registry.signatures)
    for rel, got in sorted(upload.files.items()):
        if not rel.startswith(lookaside.DIRECTORY + "/"):
            continue
        sig = expected.get(rel)
        if sig is None:
            return f"{rel}: uploaded but listed by no manifest of the new index"
        try:
            simplesign.check(verifier, got.path.read_bytes(), sig.identity, sig.digest)
        except AuthenticityError as exc:
            return f"{rel}: {exc}"
    missing = sorted(set(expected) - set(upload.files))
    return f"{missing[0]}: listed by its manifest but missing from the upload" if missing else None


def _check_sums(upload: Upload, directory: str, new: idx.Index, verifier, required: bool) -> str | None:
    text_file, sig_file = upload.files.get(f"{directory}/{SUMS}"), upload.files.get(f"{directory}/{SUMS_SIG}")
    if text_file is None or sig_file is None:
        missing = SUMS if text_file is None else SUMS_SIG
        why = "files of this directory are uploaded" if required else "it comes with its pair"
        return f"{directory}/{missing}: missing from the upload ({why})"
    text = text_file.path.read_bytes()
    try:
        verifier.verify_file(text_file.path, sig_file.path.read_bytes())  # one signature, as gpgv reads it
    except AuthenticityError as exc:
        return f"{directory}/{SUMS_SIG}: {exc}"
    problem = sums.difference(text, sums.expected(e for e in new.templates if e.directory == directory))
    return f"{directory}/{SUMS}: does not match the new index ({problem})" if problem else None


def _served_file(root: Path, rel: str) -> Path | None:
    """The served regular file at `rel`, or None (missing, or a symlink leaving the repository)."""
    found = safety.resolve_download(os.path.realpath(root), rel)
    return None if found is None else Path(os.path.realpath(root)) / found


def _hash_file(path: Path) -> Received:
    return Received(path, *hash_file(path))


def _check_listed(root: Path, upload: Upload, listed: dict[str, idx.FileRef], old: dict[str, idx.FileRef],
                  upload_problem: str | None) -> None:
    """Every file the new index lists exists, in the upload or in the repository, with its signed size and
    hashes; and no upload replaces a file the current index lists with different content."""
    for path, ref in sorted(listed.items()):
        if path in upload.files:
            previous = old.get(path)
            if previous is not None and (previous.size, previous.sha256) != (ref.size, ref.sha256):
                raise Refused(422, f"{path}: already published with other content; publish a new version "
                                   f"instead of replacing a file clients may hold")
            continue
        served = _served_file(root, path)
        if served is None:
            raise Refused(422, f"{path}: listed in the new index but neither uploaded nor in the repository")
        if old.get(path) == ref:
            # Listed with the same size and hashes by the current, verified index, whose upload checked them:
            # size only here, so a publish does not re-read every template already served.
            size = served.stat().st_size
            if size != ref.size:
                raise Refused(422, f"{path}: size {size} in the repository, the signed index says {ref.size}")
            continue
        mismatch = _matches(_hash_file(served), ref)
        if mismatch:
            raise Refused(422, mismatch + " (the file in the repository)")
    if upload_problem:
        raise Refused(422, upload_problem)


def _check_unuploaded_signatures(root: Path, upload: Upload, listed: dict[str, idx.FileRef],
                                 verifier, upload_problem: str | None) -> None:
    """A .asc uploaded for a listed file that is not itself in the upload is checked against the served file."""
    if upload_problem:
        raise Refused(422, upload_problem)
    for rel, asc in sorted(upload.files.items()):
        target = rel[:-4]
        if rel.endswith(".asc") and rel != store.INDEX_SIG and target in listed and target not in upload.files:
            served = _served_file(root, target)
            if served is None:
                raise Refused(422, f"{rel}: signs {target}, which is missing")
            try:
                verifier.verify_file(served, asc.path.read_bytes())
            except AuthenticityError as exc:
                raise Refused(422, f"{rel}: {exc}") from None


def _move_into_place(root: Path, upload: Upload, old: dict[str, idx.FileRef]) -> list[str]:
    """os.replace each uploaded file to its final path: template files, manifests and their .asc first, then
    SHA256SUMS.gpg before SHA256SUMS (a reader never pairs new sums with an old signature that passes). A file
    already served with identical content is left untouched. Returns the paths put in place."""
    def order(rel: str) -> tuple[int, str]:
        name = rel.rsplit("/", 1)[-1]
        return (2 if name == SUMS else 1 if name == SUMS_SIG else 0, rel)

    moved, dirs, backed_up = [], set(), set()
    for rel in sorted((r for r in upload.files if r not in (store.INDEX, store.INDEX_SIG)), key=order):
        got, dest = upload.files[rel], root / rel
        if _is_data(rel) and rel in old and (old[rel].size, old[rel].sha256) == (got.size, got.sha256):
            continue  # already published, byte for byte (checked against the signed index)
        if not _is_data(rel) and _same_small_file(dest, got.path):
            continue
        if dest.name in (SUMS, SUMS_SIG) and dest.parent not in backed_up:
            converge.backup_sums(dest.parent)  # the pair the current index relies on, until the new one is in
            backed_up.add(dest.parent)
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.chmod(got.path, 0o644)
            os.replace(got.path, dest)
        except OSError as exc:
            raise store.io_error("write", dest, exc) from None
        moved.append(rel)
        dirs.update(p for p in dest.parents if p == root or root in p.parents)  # new directories too
    try:
        for d in sorted(dirs, reverse=True):
            store.fsync_dir(d)
    except OSError as exc:
        raise store.io_error("write", d, exc) from None
    return moved


def _same_small_file(dest: Path, new: Path) -> bool:
    try:
        st = os.lstat(dest)
        return stat.S_ISREG(st.st_mode) and st.st_size == new.stat().st_size and dest.read_bytes() == new.read_bytes()
    except OSError:
        return False
