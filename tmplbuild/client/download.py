"""The template download: into a dot-prefixed `.part` file in the destination, hashed (sha256 and sha512) while
it arrives, resumed with Range after a transport failure, checked, then renamed into place. HTTP itself (caps,
same-origin redirects, identity encoding, the per-read timeout and the overall deadline) is tmplbuild.transport's.

Each GET gets the deadline of the bytes it is expected to bring: the signed size for a fresh download, the bytes
still missing for a resumed one (extended to the whole signed size if the server answers a Range with the whole
file).

Nothing here decides what is trusted: the caps and hashes come from the verified index (tmplbuild.client.trust).
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import queue
import re
import stat
import sys
import threading
import time
from pathlib import Path

from tmplbuild.client import trust
from tmplbuild.errors import AuthenticityError, LocalIOError, OversizeError, TransportError
from tmplbuild.files import Writeback, fsync_path
from tmplbuild.repo.index import FileRef
from tmplbuild.transport import CHUNK, Broken, Reply, Transport, expect_status

__all__ = ["Transport", "Hasher", "Progress", "hash_file", "present", "install"]

_CONTENT_RANGE = re.compile(r"\Abytes (\d+)-(\d+)/(\d+|\*)\Z")


class Hasher:
    """sha256 and sha512 of a stream, each on its own thread: hashlib drops the GIL on large buffers, so both
    digests run beside the main thread's socket reads and file writes (2 cores: the download's wall time,
    not download + hashing)."""

    def __init__(self) -> None:
        self.size = 0
        self._digests = [hashlib.sha256(), hashlib.sha512()]
        self._queues: list[queue.Queue[bytes | None]] = [queue.Queue(maxsize=16) for _ in self._digests]
        self._threads = [threading.Thread(target=self._work, args=(d, q), daemon=True)
                         for d, q in zip(self._digests, self._queues)]
        for t in self._threads:
            t.start()

    @staticmethod
    def _work(digest: hashlib._Hash, q: queue.Queue[bytes | None]) -> None:
        while (chunk := q.get()) is not None:
            digest.update(chunk)

    def update(self, chunk: bytes) -> None:
        self.size += len(chunk)
        for q in self._queues:
            q.put(chunk)

    def close(self) -> None:
        for q, t in zip(self._queues, self._threads):
            if t.is_alive():
                q.put(None)
                t.join()

    def hexdigests(self) -> tuple[str, str]:
        self.close()
        return self._digests[0].hexdigest(), self._digests[1].hexdigest()


def hash_file(path: Path) -> tuple[int, str, str]:
    """(size, sha256, sha512) of a file. Raises LocalIOError."""
    hasher = Hasher()
    try:
        with open(path, "rb") as f:
            _hash_stream(f, hasher)
    except OSError as exc:
        raise LocalIOError("read", f"{path}: {exc.strerror}") from None
    finally:
        hasher.close()
    return (hasher.size, *hasher.hexdigests())


def _hash_stream(f, hasher: Hasher) -> None:
    while chunk := f.read(CHUNK):
        hasher.update(chunk)


class Progress:
    """A one-line progress display on stderr, only when stderr is a terminal."""

    def __init__(self, label: str, total: int, enabled: bool | None = None) -> None:
        self.label, self.total = label, total
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.done = 0
        self._start = time.monotonic()
        self._base = 0
        self._last = 0.0
        self._shown = False

    def begin(self, done: int) -> None:
        self.done = self._base = done
        self._start = time.monotonic()

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.enabled and (now - self._last >= 0.1 or self.done >= self.total):
            self._last = now
            rate = (self.done - self._base) / max(now - self._start, 1e-6) / (1 << 20)
            pct = 100 * self.done // self.total if self.total else 100
            sys.stderr.write(f"\r{self.label} {pct:3d}% {self.done / (1 << 20):.1f}/{self.total / (1 << 20):.1f} "
                             f"MiB {rate:.1f} MiB/s\x1b[K")
            sys.stderr.flush()
            self._shown = True

    def finish(self) -> None:
        if self._shown:
            sys.stderr.write("\n")
            sys.stderr.flush()
            self._shown = False


def present(path: Path, ref: FileRef) -> bool:
    """True if `path` is a regular file with the signed size, sha256 and sha512 (then nothing to download)."""
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise LocalIOError("destination", f"{path}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode) or st.st_size != ref.size:
        return False
    size, sha256, sha512 = hash_file(path)
    return (size, sha256, sha512) == (ref.size, ref.sha256, ref.sha512)


class _Part:
    """One download into an open, locked `.part` file."""

    def __init__(self, transport: Transport, url: str, ref: FileRef, f, progress: Progress) -> None:
        self.transport, self.url, self.ref, self.f, self.progress = transport, url, ref, f, progress
        self.resumed = False  # True while the part's content comes partly from an earlier answer
        self.hasher = Hasher()
        self.writeback = Writeback(f.fileno())

    def run(self, resume: bool) -> tuple[str, str]:
        """Fill the part up to the signed size; return its (sha256, sha512), over the whole file. Raises
        TransportError, AuthenticityError("size") when the server announces another size."""
        f, ref = self.f, self.ref
        try:
            offset = os.fstat(f.fileno()).st_size if resume else 0
            if offset > ref.size:  # longer than what was signed: not a prefix of it
                offset = 0
            if offset:
                # The whole file is hashed: first the part already there, then what the server adds.
                f.seek(0)
                remaining = offset
                while remaining:
                    chunk = f.read(min(CHUNK, remaining))
                    if not chunk:
                        raise LocalIOError("read", "the .part file shrank while it was being hashed")
                    self.hasher.update(chunk)
                    remaining -= len(chunk)
                self.resumed = True
            else:
                f.truncate(0)
            while offset < ref.size and self._fetch(offset):
                # A server that answered for another range: start again from byte 0.
                offset = self._restart()
            f.flush()
            self.writeback.close()
            os.fsync(f.fileno())
            return self.hasher.hexdigests()
        finally:
            self.writeback.close()
            self.hasher.close()

    def _restart(self) -> int:
        self.hasher.close()
        self.hasher = Hasher()
        self.resumed = False
        self.f.truncate(0)
        return 0

    def _fetch(self, offset: int) -> bool:
        """One GET from `offset`. Returns True when it must be redone from 0 (Range misanswered)."""
        ref, url = self.ref, self.url
        headers = {"Range": f"bytes={offset}-"} if offset else None
        # The deadline of the bytes still missing (all of them for a fresh download).
        what = ref.path.rsplit("/", 1)[-1]
        with self.transport.open(url, headers, what=what, size=ref.size - offset) as resp:
            if offset and resp.status_code == 200:
                # Range ignored: this answer is the whole file, so it replaces the part from byte 0, and the
                # deadline is that of the whole file.
                resp.deadline.extend(ref.size)
                return self._fetch_body(resp, self._restart())
            if offset and resp.status_code == 416:
                return True
            if offset:
                expect_status(resp, url, (206,))
                m = _CONTENT_RANGE.match(resp.headers.get("Content-Range", "").strip())
                if not m or int(m.group(1)) != offset or int(m.group(2)) != ref.size - 1 \
                        or m.group(3) not in ("*", str(ref.size)):
                    return True
            else:
                expect_status(resp, url, (200,))
            return self._fetch_body(resp, offset)

    def _fetch_body(self, resp: Reply, offset: int) -> bool:
        ref, url, f = self.ref, self.url, self.f
        expected = ref.size - offset
        length = resp.content_length()
        if length is not None and length > expected:
            raise OversizeError("download size", f"{url}: server announces {length} bytes, expected {expected} "
                                                  f"(signed size {ref.size})")
        if length is not None and length < expected:
            raise AuthenticityError("size", f"{url}: server announces {length} bytes, expected {expected} "
                                            f"(signed size {ref.size}): not the signed file")
        f.seek(offset)
        self.progress.begin(offset)
        done = 0
        try:
            for chunk in resp.body():
                if done + len(chunk) > expected:
                    raise OversizeError("download size", f"{url}: more than the signed {ref.size} bytes")
                f.write(chunk)
                self.hasher.update(chunk)
                self.writeback.wrote(len(chunk))
                done += len(chunk)
                self.progress.update(len(chunk))
        except Broken as exc:
            raise TransportError("truncated", f"{url}: {offset + done} of {ref.size} bytes, then {exc}") from None
        if done < expected:
            raise TransportError("truncated", f"{url}: {offset + done} of {ref.size} bytes")
        return False


def install(transport: Transport, url: str, ref: FileRef, dest: Path, filename: str,
            progress: Progress) -> str:
    """Checks 8 to 10: download `url` into `dest/.filename.part` capped at the signed size, hashing while it
    arrives; check size, sha256 and sha512; rename to `dest/filename`. Returns "fetched", "present" (a file
    with the signed size and hashes was already there) or "replaced" (a file was there that did not match). On failure the destination is as it was, except a
    `.part` kept after a transport failure mid-download, which the next run resumes (Range: bytes=N-) and
    still hashes whole. Raises TransportError, AuthenticityError, LocalIOError."""
    final = dest / filename
    if not dest.is_dir():
        raise LocalIOError("destination", f"{dest}: not a directory")
    if present(final, ref):
        return "present"
    replacing = os.path.lexists(final)  # there, but not the signed file: said when it is replaced
    part = dest / f".{filename}.part"
    try:
        fd = os.open(part, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise LocalIOError("destination", f"cannot write {part}: {exc.strerror}") from None
    f = os.fdopen(fd, "r+b")
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LocalIOError("lock", f"{part}: another tmplbuild fetch is writing it") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise LocalIOError("destination", f"{part}: not a regular file")
        try:
            attempt = _Part(transport, url, ref, f, progress)
            try:
                sha256, sha512 = attempt.run(resume=True)
                trust.check_file(ref, os.fstat(fd).st_size, sha256, sha512, filename)
            except AuthenticityError:
                if not attempt.resumed:
                    raise
                # The kept part may hold another answer's bytes: one more try from byte 0, same mirror.
                attempt = _Part(transport, url, ref, f, progress)
                sha256, sha512 = attempt.run(resume=False)
                trust.check_file(ref, os.fstat(fd).st_size, sha256, sha512, filename)
            finally:
                progress.finish()
        except TransportError as exc:
            try:
                f.flush()  # what arrived is worth keeping for the next run, even a few bytes
                size = os.fstat(fd).st_size
            except OSError:
                size = 0
            if isinstance(exc, OversizeError) or not 0 < size < ref.size:
                part.unlink(missing_ok=True)
            raise
        except OSError as exc:  # writing the part (socket errors are TransportErrors by now)
            part.unlink(missing_ok=True)
            raise LocalIOError("write", f"{part}: {exc.strerror or exc}") from None
        except BaseException:
            part.unlink(missing_ok=True)
            raise
        try:
            os.replace(part, final)
            fsync_path(dest, directory=True)
        except OSError as exc:
            part.unlink(missing_ok=True)
            raise LocalIOError("install", f"cannot rename {part} to {final}: {exc.strerror}") from None
    finally:
        f.close()
    return "replaced" if replacing else "fetched"
