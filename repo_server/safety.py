"""What the server refuses: paths that leave the served tree, private key material inside it, and the
leftovers of uploads that a crash interrupted.

Pure functions over a repository root; no Flask in here, so the rules are testable on their own."""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import shutil
import stat
from pathlib import Path

from tmplbuild.builder.normalize import find_private_keys
from tmplbuild.errors import UnsafeContentError

UPLOAD_PREFIX = ".upload-"  # a dot-dir inside the repository: same filesystem (os.replace), never served
GNUPG_SECRET_NAMES = {"private-keys-v1.d", "secring.gpg"}  # GnuPG homes: refused even when empty


def resolve_download(root_real: str, subpath: str) -> str | None:
    """The path (relative to the repository) of the regular file a URL path names, or None when it must be
    a 404: anything with a backslash or NUL, an empty, `.` or `..` component, a dotfile or anything under a
    dot-directory (.lock, .pending, .upload-*), and anything that resolves (through symlinks) outside the
    repository or into a dot-path. `root_real` is os.path.realpath of the repository. `subpath` is the
    already percent-decoded URL path, so `%2e%2e` and `..%2f` arrive here as `..`."""
    if not subpath or "\\" in subpath or "\0" in subpath:
        return None
    parts = subpath.split("/")
    if any(p in ("", ".", "..") or p.startswith(".") or p in GNUPG_SECRET_NAMES for p in parts):
        return None
    real = os.path.realpath(os.path.join(root_real, *parts))
    if not real.startswith(root_real + os.sep):
        return None
    rel = real[len(root_real) + 1:]
    if any(p.startswith(".") or p in GNUPG_SECRET_NAMES for p in rel.split(os.sep)):
        return None  # a symlink into .pending/, .upload-*/ or a key home
    try:
        if not stat.S_ISREG(os.stat(real).st_mode):
            return None
    except OSError:
        return None
    return rel


def private_key_findings(root: Path) -> list[str]:
    """Repository-relative paths holding private key material: the builder's own scan (PEM and OpenSSH private
    keys, armored or binary OpenPGP secret keys, files in GnuPG's private-keys-v1.d) plus any GnuPG secret
    key store by name, even an empty one (`private-keys-v1.d` directories, `secring.gpg`)."""
    found = set(find_private_keys(root))
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        for name in (*dirnames, *filenames):
            if name in GNUPG_SECRET_NAMES:
                found.add(os.path.normpath(os.path.join(rel_dir, name)))
    return sorted(found)


def refuse_private_keys(root: Path) -> None:
    """Raises UnsafeContentError (exit 6) when the repository holds private key material."""
    found = private_key_findings(root)
    if found:
        shown = ", ".join("/" + p for p in found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "")
        raise UnsafeContentError("private key scan", f"refusing to serve {root}: private key material in "
                                                     f"{shown} (the server holds public keys only)")


def lock_dir(path: Path) -> int:
    """Open `path` (a directory) and hold an exclusive flock on it: the mark of an upload in progress.
    Returns the fd; the lock goes with it when it is closed or the process dies."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BaseException:
        os.close(fd)
        raise
    return fd


def sweep_uploads(root: Path, log: logging.Logger | None = None) -> list[str]:
    """Remove `.upload-*` directories left by a crashed upload. A directory whose lock is held belongs to an
    upload still running (another worker or server process) and is left alone. Returns the names removed."""
    removed = []
    for path in sorted(root.glob(UPLOAD_PREFIX + "*")):
        if path.is_symlink() or not path.is_dir():
            continue
        try:
            fd = lock_dir(path)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                continue  # in use
            raise
        try:
            shutil.rmtree(path, ignore_errors=True)
        finally:
            os.close(fd)
        removed.append(path.name)
        if log is not None:
            log.warning("removed %s, left by an interrupted upload", path.name)
    return removed
