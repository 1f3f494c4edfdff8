"""The Debian archive as seen by one build: its signed Release identity, its package index, and the .debs in
the shared package cache. Everything read from the mirror is verified before use: InRelease by gpgv against
the recipe's keyring and then for freshness (Valid-Until, Date) as apt checks it, Packages by the SHA256 listed
in that InRelease, each .deb by the SHA256 in Packages."""
from __future__ import annotations

import hashlib
import lzma
import os
import re
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tmplbuild.errors import AuthenticityError, FreshnessError, LocalIOError, TransportError
from tmplbuild.files import atomic_write, sha256_file
from tmplbuild.run import run
from tmplbuild.transport import Broken, Transport

INRELEASE_CAP = 16 << 20
PACKAGES_CAP = 512 << 20
MAX_FUTURE_SECONDS = 10  # apt's Acquire::Max-FutureTime default: how far a Release's Date may be ahead of now


@dataclass(frozen=True)
class ReleaseInfo:
    suite: str
    codename: str
    date: str  # RFC 2822, as written by the archive
    epoch: int  # the Date field in seconds: the default SOURCE_DATE_EPOCH of a build
    inrelease_sha256: str  # identity of the archive state the build saw
    files: dict[str, tuple[str, int]]  # path -> (sha256, size), from the signed SHA256 field
    raw: bytes  # the InRelease bytes, placed into the tree for debootstrap
    valid_until: int | None = None  # the Valid-Until field in seconds; None when the archive sets none


@dataclass(frozen=True)
class Package:
    name: str
    version: str
    arch: str
    filename: str
    sha256: str
    size: int
    priority: str
    depends: tuple[str, ...]  # first alternative of each Depends/Pre-Depends clause, debootstrap's rule
    base_url: str = ""  # the mirror this package is downloaded from
    origin: str = ""  # "<suite>/<component>": the index it was chosen from

    @property
    def deb_name(self) -> str:
        # debootstrap's cache and archive naming: the epoch colon is escaped as %3a.
        return f"{self.name}_{self.version}_{self.arch}.deb".replace(":", "%3a", 1)


class Fetcher:
    """The builder's reads from the mirror, over tmplbuild.transport (the one set of HTTP rules: caps, the
    overall deadline from the expected size, same-origin redirects, identity encoding), plus file:// for local
    mirrors. Connection failures are retried twice (a mirror's CDN drops idle connections)."""

    def __init__(self, transport: Transport | None = None) -> None:
        self.transport = transport or Transport(allow_file=True, retries=2, pool=8)

    def to_file(self, url: str, dest: Path, cap: int, sha256: str | None = None) -> None:
        """Download url to dest through a temporary file; the final path appears only after size and hash
        (when given) match. The deadline is that of `cap` bytes (the signed size). Raises TransportError,
        AuthenticityError, LocalIOError."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".part-")
        digest = hashlib.sha256()
        total = 0
        try:
            with os.fdopen(fd, "wb") as out, self.transport.open(url, what=url, size=cap) as reply:
                reply.expect((200,))
                length = reply.content_length()
                if length is not None and length > cap:
                    raise TransportError("download size", f"{url}: more than {cap} bytes")
                try:
                    for chunk in reply.body():
                        total += len(chunk)
                        if total > cap:
                            raise TransportError("download size", f"{url}: more than {cap} bytes")
                        digest.update(chunk)
                        out.write(chunk)
                except Broken as exc:
                    raise TransportError("truncated", f"{url}: {total} bytes, then {exc}") from None
                if length is not None and total != length:
                    raise TransportError("truncated", f"{url}: {total} bytes, expected {length} (Content-Length)")
            if sha256 is not None and digest.hexdigest() != sha256:
                raise AuthenticityError("sha256", f"{url}: got {digest.hexdigest()}, expected {sha256}")
            os.replace(tmp, dest)
        except OSError as exc:
            raise LocalIOError("package cache", f"{dest}: {exc.strerror}") from None
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def get(self, url: str, cap: int) -> bytes:
        """The body of `url`, at most `cap` bytes, within the deadline of `cap` bytes. Raises TransportError."""
        return self.transport.get_bytes(url, cap, url)

    def close(self) -> None:
        self.transport.close()


def verify_inrelease(data: bytes, keyring: Path, what: str) -> bytes:
    """The signed text of a clearsigned InRelease, after gpgv accepted it with the keyring alone (as apt
    does). Raises AuthenticityError when the signature is bad, missing, expired, revoked or by an unknown key:
    gpgv's exit code is checked and so are its status lines."""
    with tempfile.TemporaryDirectory(prefix="tmplbuild-gpgv-") as home:
        src, out = Path(home, "InRelease"), Path(home, "Release")
        src.write_bytes(data)
        try:
            proc = run(
                ["gpgv", "--status-fd", "1", "--keyring", keyring, "--output", out, src],
                check="archive signature", capture=True, error=AuthenticityError,
                env={"GNUPGHOME": home},  # an empty home: no user configuration or trust settings are read
            )
        except AuthenticityError as exc:
            reason = exc.message.rsplit(": ", 1)[-1] if ": " in exc.message else exc.message
            raise AuthenticityError("archive signature", f"{what}: refused with keyring {keyring}: {reason}") \
                from None
        status = proc.stdout.decode(errors="replace")
        bad = [k for k in ("BADSIG", "ERRSIG", "EXPKEYSIG", "REVKEYSIG", "EXPSIG", "NO_PUBKEY")
               if re.search(rf"^\[GNUPG:\] {k} ", status, re.M)]
        if bad or not re.search(r"^\[GNUPG:\] VALIDSIG ", status, re.M):
            raise AuthenticityError(
                "archive signature",
                f"{what}: not signed by a valid key in {keyring} ({', '.join(bad) or 'no VALIDSIG'})",
            )
        return out.read_bytes()


def parse_release(signed: bytes, raw: bytes) -> ReleaseInfo:
    """Fields of a verified Release text. Raises AuthenticityError when a field the build relies on is
    missing (a Release without Date or SHA256 cannot pin an archive state)."""
    import datetime
    from email.utils import parsedate_to_datetime

    text = signed.decode("utf-8", errors="replace")
    fields: dict[str, str] = {}
    key = ""
    for line in text.splitlines():
        if line[:1] in (" ", "\t") and key:
            fields[key] += "\n" + line.strip()
        elif ":" in line:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    try:
        epoch = int(parsedate_to_datetime(fields["Date"]).timestamp())
    except (KeyError, ValueError, TypeError) as exc:
        raise AuthenticityError("archive Release", f"missing or malformed field: {exc}") from None
    valid_until = None
    if "Valid-Until" in fields:
        try:
            when = parsedate_to_datetime(fields["Valid-Until"])
            if when.tzinfo is None:  # RFC 2822's "-0000": UTC, not the build host's zone
                when = when.replace(tzinfo=datetime.timezone.utc)
            valid_until = int(when.timestamp())
        except (ValueError, TypeError, IndexError, OverflowError):
            raise AuthenticityError("archive Release",
                                    f"malformed Valid-Until: {fields['Valid-Until'][:80]!r}") from None
    try:
        files: dict[str, tuple[str, int]] = {}
        for entry in fields["SHA256"].split("\n"):
            parts = entry.split()
            if len(parts) == 3:
                files[parts[2]] = (parts[0], int(parts[1]))
    except (KeyError, ValueError, TypeError) as exc:
        raise AuthenticityError("archive Release", f"missing or malformed field: {exc}") from None
    return ReleaseInfo(
        suite=fields.get("Suite", ""), codename=fields.get("Codename", ""), date=fields["Date"], epoch=epoch,
        inrelease_sha256=hashlib.sha256(raw).hexdigest(), files=files, raw=raw, valid_until=valid_until,
    )


def fetch_release(fetcher: Fetcher, mirror: str, suite: str, keyring: Path,
                  now: float | None = None) -> ReleaseInfo:
    """Download and verify dists/SUITE/InRelease, then check it is fresh at `now` (default: the clock).
    Raises TransportError, AuthenticityError, FreshnessError."""
    url = f"{mirror}/dists/{suite}/InRelease"
    raw = fetcher.get(url, INRELEASE_CAP)
    release = parse_release(verify_inrelease(raw, keyring, url), raw)
    check_freshness(release, suite, url, time.time() if now is None else now)
    return release


def check_freshness(release: ReleaseInfo, suite: str, url: str, now: float) -> None:
    """apt's checks of a Release's dates: Valid-Until must not be past (a replayed or stale archive) and Date
    must not be more than MAX_FUTURE_SECONDS ahead (a wrong clock, or metadata made to outlive its time). A
    Release without Valid-Until is accepted, as apt does. Raises FreshnessError."""
    def utc(t: float) -> str:
        return time.strftime("%a, %d %b %Y %H:%M:%S UTC", time.gmtime(t))

    if release.valid_until is not None and now > release.valid_until:
        raise FreshnessError("archive freshness", f"{suite}: Valid-Until {utc(release.valid_until)} is in the past "
                                                  f"(now {utc(now)}): a replayed or stale archive at {url}")
    if release.epoch > now + MAX_FUTURE_SECONDS:
        raise FreshnessError("archive freshness", f"{suite}: Date {release.date} is in the future (now {utc(now)}, "
                                                  f"{release.epoch - int(now)} s ahead): a wrong clock or a "
                                                  f"forged archive at {url}")


def parse_packages(text: bytes, base_url: str = "", origin: str = "") -> dict[str, Package]:
    """Package stanzas by name (the first stanza of a name wins, as in debootstrap's pkgdetails)."""
    packages: dict[str, Package] = {}
    for stanza in text.split(b"\n\n"):
        f: dict[bytes, bytes] = {}
        for line in stanza.split(b"\n"):
            if line[:1] not in (b" ", b"\t") and b":" in line:
                k, _, v = line.partition(b":")
                if k in _WANTED:
                    f[k] = v.strip()
        name = f.get(b"Package", b"").decode()
        if not name or name in packages:
            continue
        deps: list[str] = []
        for field in (b"Pre-Depends", b"Depends"):
            for clause in f.get(field, b"").decode().split(","):
                dep = clause.split("|")[0].split("(")[0].split(":")[0].strip()
                if dep:
                    deps.append(dep)
        packages[name] = Package(
            name=name, version=f[b"Version"].decode(), arch=f[b"Architecture"].decode(),
            filename=f[b"Filename"].decode(), sha256=f[b"SHA256"].decode(), size=int(f[b"Size"]),
            priority=f.get(b"Priority", b"").decode(), depends=tuple(deps), base_url=base_url, origin=origin,
        )
    return packages


def merge_newest(indices: list[dict[str, Package]]) -> dict[str, Package]:
    """One view over several suites (bookworm, bookworm-updates, bookworm-security): the highest version of
    each package wins, as apt would install it; a package keeps the position of its first appearance."""
    merged: dict[str, Package] = {}
    for index in indices:
        for name, pkg in index.items():
            old = merged.get(name)
            if old is None or version_compare(pkg.version, old.version) > 0:
                merged[name] = pkg
    return merged


def version_compare(a: str, b: str) -> int:
    """dpkg's version ordering (epoch, upstream, revision; `~` sorts before everything, even the end)."""
    def split(v: str) -> tuple[int, str, str]:
        epoch, _, rest = v.rpartition(":") if ":" in v else ("0", "", v)
        upstream, _, revision = rest.rpartition("-") if "-" in rest else (rest, "", "0")
        return int(epoch or 0), upstream, revision

    def order(c: str) -> int:
        if c == "~":
            return -1
        if c.isalpha():
            return ord(c)
        return ord(c) + 256

    def part(x: str, y: str) -> int:
        while x or y:
            xs = re.match(r"[^0-9]*", x).group()
            ys = re.match(r"[^0-9]*", y).group()
            for i in range(max(len(xs), len(ys))):
                cx = order(xs[i]) if i < len(xs) else 0
                cy = order(ys[i]) if i < len(ys) else 0
                if cx != cy:
                    return -1 if cx < cy else 1
            x, y = x[len(xs):], y[len(ys):]
            xd = re.match(r"[0-9]*", x).group()
            yd = re.match(r"[0-9]*", y).group()
            if int(xd or 0) != int(yd or 0):
                return -1 if int(xd or 0) < int(yd or 0) else 1
            x, y = x[len(xd):], y[len(yd):]
        return 0

    (ea, ua, ra), (eb, ub, rb) = split(a), split(b)
    if ea != eb:
        return -1 if ea < eb else 1
    return part(ua, ub) or part(ra, rb)


def select_stanzas(text: bytes, names: set[str]) -> bytes:
    """The stanzas of `names` only, in index order: what debootstrap needs to install a resolved plan. Its
    shell scans the whole index for every pre-dependency; a trimmed index makes each scan trivial."""
    out = []
    for stanza in text.split(b"\n\n"):
        if stanza.startswith(b"Package: "):
            name = stanza[9:stanza.find(b"\n")].decode()
        else:
            m = re.search(rb"^Package: (\S+)", stanza, re.M)
            name = m.group(1).decode() if m else ""
        if name in names:
            out.append(stanza.strip(b"\n"))
    return b"\n\n".join(out) + b"\n\n" if out else b""


_WANTED = {b"Package", b"Version", b"Architecture", b"Filename", b"SHA256", b"Size", b"Priority",
           b"Depends", b"Pre-Depends"}


def fetch_packages(fetcher: Fetcher, mirror: str, release: ReleaseInfo, suite: str, component: str, arch: str,
                   cache: Path) -> Path:
    """The uncompressed Packages file of one component, verified against the signed Release and kept in the
    cache under its hash, so a warm build neither downloads nor decompresses it again."""
    rel = f"{component}/binary-{arch}/Packages"
    if rel not in release.files:
        raise AuthenticityError("archive index", f"{suite}: Release lists no {rel}")
    sha, size = release.files[rel]
    dest = cache / "indices" / f"{sha}.Packages"
    if dest.exists():
        return dest
    for suffix, decompress in ((".xz", lzma.decompress), ("", None)):
        if rel + suffix not in release.files:
            continue
        xsha, xsize = release.files[rel + suffix]
        data = fetcher.get(f"{mirror}/dists/{suite}/{rel}{suffix}", xsize + 1)
        if hashlib.sha256(data).hexdigest() != xsha:
            raise AuthenticityError("archive index", f"{rel}{suffix}: sha256 differs from the signed Release")
        if decompress:
            data = decompress(data)
        if hashlib.sha256(data).hexdigest() != sha or len(data) != size:
            raise AuthenticityError("archive index", f"{rel}: sha256 differs from the signed Release")
        atomic_write(dest, data, check="package cache")
        return dest
    raise AuthenticityError("archive index", f"{suite}: Release lists no usable {rel}")


def resolve(names: list[str], packages: dict[str, Package], exclude_dependency: frozenset[str]) -> list[str]:
    """debootstrap's resolve_deps: the closure over the first alternative of each (Pre-)Depends clause,
    dropping names that are not real packages (virtual ones). Sorted, as debootstrap sorts."""
    seen = set(names)
    todo = list(names)
    while todo:
        new: set[str] = set()
        for name in todo:
            pkg = packages.get(name)
            if pkg:
                new.update(d for d in pkg.depends if d not in exclude_dependency)
        todo = sorted(n for n in new if n in packages and n not in seen)
        seen.update(todo)
    return sorted(seen)


def download_debs(fetcher: Fetcher, mirror: str, wanted: list[Package], cache: Path) -> list[Path]:
    """Each .deb in the shared cache, downloaded in parallel where missing. A cached file is trusted only
    when its size and sha256 match the signed index: a corrupt cache entry is fetched again, not used."""
    debs = cache / "debs"

    def one(pkg: Package) -> Path:
        dest = debs / pkg.deb_name
        if dest.exists() and dest.stat().st_size == pkg.size and sha256_file(dest) == pkg.sha256:
            return dest
        fetcher.to_file(f"{pkg.base_url or mirror}/{pkg.filename}", dest, pkg.size, pkg.sha256)
        return dest

    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(one, wanted))


