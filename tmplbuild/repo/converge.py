"""Converging a repository on its signed index.

The signed index is the only truth about what is published. A publisher renames its files into
templates/<name>/<version>/ before it swaps the index in; when it dies (or its disk fills) in between, those files
are served but listed nowhere, and `repo verify` fails until someone removes them. `converge` takes the tree back
to exactly what the current signed index lists. Every publish runs it (local and on the server: first, and again
to undo its own work when it fails), so do the server's start and `repo verify --repair`; always under the
repository lock (store.locked), so no publisher's in-flight work can be taken for a leftover: a local publisher
stages its .part files under templates/ only while it holds the lock, and the server stages uploads in
.upload-* directories outside templates/, each flocked while in use."""
from __future__ import annotations

import os
import stat
import time
from collections.abc import Callable
from pathlib import Path

from tmplbuild.repo import index as idx
from tmplbuild.repo import lookaside
from tmplbuild.repo import sums
from tmplbuild.repo import root as rootdoc
from tmplbuild.repo.store import (INDEX, INDEX_SIG, SUMS, SUMS_SIG, TEMPLATES, fsync_dir, io_error, key_files,
                                  load_index, recover)

QUARANTINE = ".quarantine"  # what `repo verify --repair` moves aside (a dot-path: never served)
SumsWriter = Callable[[Path, list[idx.Entry]], None]


def sums_backup(directory: Path, name: str) -> Path:
    return directory / f".{name}.prev"


def backup_sums(directory: Path) -> None:
    """Before a publisher replaces the SHA256SUMS pair of a directory the index already lists: hard-link the
    pair to dot-names next to it (no data is copied), so that `converge` can put it back when the new index
    never arrives. Call with the lock held. A backup already there is kept: it was made earlier in the same
    publish (two architectures of one version), since `converge`, run first, leaves none behind. Raises
    LocalIOError."""
    for name in (SUMS, SUMS_SIG):
        final, backup = directory / name, sums_backup(directory, name)
        if not final.is_file() or final.is_symlink() or backup.exists():
            continue
        tmp = directory / f".{name}.prev.part"
        try:
            tmp.unlink(missing_ok=True)
            os.link(final, tmp)
            os.replace(tmp, backup)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise io_error("write", backup, exc) from None


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _sums_match(path: Path, entries: list[idx.Entry]) -> bool:
    """`path` (a SHA256SUMS) names exactly the files and hashes the index lists for its directory."""
    return sums.matches(path, sums.expected(entries))


def converge(root: Path, current: idx.Index, repair: bool = False,
             write_sums: SumsWriter | None = None) -> list[str]:
    """Bring the served tree back to what `current` lists; returns what was done, one line each.

    Call with the lock held and `current` the index on disk, verified with the repository's pinned keys: a file
    or directory that index lists is never touched. Under templates/:
    - a directory's SHA256SUMS pair that does not match the index is put back from the backup a publisher made
      (`backup_sums`) when that matches, else rewritten by `write_sums` when one is given (a local publish,
      which holds the signing key); leftover backups are removed;
    - every other regular file the index does not list (the files of a publish that died, or whose disk filled,
      before its index swap; stale .part files) is deleted, and then every empty directory. These are copies of
      artifacts the publisher still has: nothing is lost, and deleting (rather than moving aside) frees the
      space a full disk needs back.
    The same for the lookaside signatures under sigstore/ that the index lists through its manifests
    (tmplbuild.repo.lookaside), when every listed manifest reads as signed.
    Symlinks, devices and anything else outside templates/ are not a publisher's leftovers: left alone, unless
    `repair`, which moves every unlisted non-dot path of the served tree to .quarantine/<stamp>/ instead of
    deleting it (an admin put it there; it is theirs to look at)."""
    done: list[str] = []
    by_dir: dict[str, list[idx.Entry]] = {}
    keep = {INDEX, INDEX_SIG}
    for e in current.templates:
        by_dir.setdefault(e.directory, []).append(e)
        for ref in (*e.files, e.manifest):
            keep |= {ref.path, ref.path + ".asc"}
    for directory in by_dir:
        keep |= {f"{directory}/{SUMS}", f"{directory}/{SUMS_SIG}"}
    quarantine = root / QUARANTINE / time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())

    def set_aside(path: Path, rel: str) -> None:
        dest = quarantine / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, dest)
        done.append(f"quarantined {rel} (not listed in the index) to {dest.relative_to(root).as_posix()}")

    # 1. The SHA256SUMS pair of each listed directory.
    for directory, entries in sorted(by_dir.items()):
        d = root / directory
        backups = [sums_backup(d, n) for n in (SUMS, SUMS_SIG)]
        if _sums_match(backups[0], entries) and backups[1].is_file():
            # The pair as it was before a publish that never got its index in (either file may be new already).
            if not all(_same_file(b, d / n) for b, n in zip(backups, (SUMS, SUMS_SIG))):
                for name in (SUMS_SIG, SUMS):  # the signature first, as a publisher renames them
                    os.replace(sums_backup(d, name), d / name)
                fsync_dir(d)
                done.append(f"restored {directory}/{SUMS} and {SUMS_SIG} as the index lists them")
        elif write_sums is not None and d.is_dir() and not _sums_match(d / SUMS, entries):
            write_sums(d, entries)
            done.append(f"re-signed {directory}/{SUMS} to match the index")
        for b in backups:
            if b.exists():
                b.unlink()

    # 2. Unlisted files under templates/ and sigstore/ (the OCI images' lookaside signatures, listed through the
    # manifests), then empty directories. sigstore/ only when every manifest could be read as signed.
    signatures = lookaside.listed(root, current.templates)
    managed = [TEMPLATES] + ([lookaside.DIRECTORY] if signatures is not None else [])
    keep |= set(signatures or {})
    for top in managed:
        _remove_unlisted(root, root / top, keep, repair, set_aside, done)

    # 3. With --repair: whatever else is served and unlisted (keys/ keeps its pinned keys, root/ its root
    # documents and their signatures: the chain is checked by whoever reads it, never tidied away here).
    if repair:
        keys = {f"keys/{p.name}" for p in key_files(root)} | rootdoc.files_in(root)
        for dirpath, dirnames, filenames in os.walk(root):
            base = Path(dirpath)
            dirnames[:] = sorted(n for n in dirnames if not n.startswith(".")
                                 and not (base == root and n in managed))
            for name in sorted(filenames + [n for n in dirnames if (base / n).is_symlink()]):
                rel = (base / name).relative_to(root).as_posix()
                if not name.startswith(".") and rel not in keep and rel not in keys:
                    set_aside(base / name, rel)
            dirnames[:] = [n for n in dirnames if (base / n).exists() and not (base / n).is_symlink()]
    return done


def _remove_unlisted(root: Path, top: Path, keep: set[str], repair: bool, set_aside: Callable[[Path, str], None],
                     done: list[str]) -> None:
    """Under `top`: delete every regular file not in `keep`, then every empty directory, deepest first.
    Dot-directories (not served) are not entered, and of dot-files only a publisher's own (.part, .prev) are
    removed; with `repair`, other unlisted non-dot paths (symlinks, devices) are set aside."""
    if not top.is_dir() or top.is_symlink():
        return
    before = len(done)
    walked = []
    for dirpath, dirnames, filenames in os.walk(top):
        base = Path(dirpath)
        links = [n for n in dirnames if (base / n).is_symlink()]
        dirnames[:] = sorted(n for n in dirnames if not n.startswith(".") and n not in links)
        walked.append((base, sorted(filenames + links), list(dirnames)))
    for base, names, subdirs in reversed(walked):  # a directory after everything under it
        for name in subdirs:
            path = base / name
            try:
                path.rmdir()
            except OSError:
                continue  # not empty: holds something listed, or an admin's symlink or dot-file
            done.append(f"removed empty directory {path.relative_to(root).as_posix()}/")
        for name in names:
            path = base / name
            rel = path.relative_to(root).as_posix()
            if rel in keep or (name.startswith(".") and not name.endswith((".part", ".prev"))):
                continue
            if stat.S_ISREG(os.lstat(path).st_mode):
                path.unlink()
                done.append(f"removed {rel} (not listed in the index)")
            elif repair and not name.startswith("."):
                set_aside(path, rel)
    if len(done) > before:
        fsync_dir(top)


def roll_back(root: Path, verifier, log=None,
              write_sums: SumsWriter | None = None) -> list[str]:
    """After a publish failed under the lock: finish or discard its index swap, then converge on the index that
    is now in place (the new one if the swap got that far, else the previous one). Never raises: what it cannot
    do now, the next publish, server start or `repo verify --repair` does."""
    try:
        done = recover(root)
        current, _ = load_index(root, verifier)
        done += converge(root, current, write_sums=write_sums)
    except Exception as exc:  # noqa: BLE001 - the original error is what the caller reports
        if log is not None:
            log.warning("clean-up after the failed publish incomplete: %s", exc)
        return []
    if log is not None:
        for line in done:
            log.warning("clean-up after the failed publish: %s", line)
    return done


def settle(root: Path, new: idx.Index) -> None:
    """After a publish swapped `new` in: converge on it (dropping the SHA256SUMS backups it made). The publish
    has succeeded, so a failure here is not reported as its failure: the next converge finishes the job."""
    try:
        converge(root, new)
    except OSError:
        pass
