"""Which template versions of a repository carry a package, or carry it below the version that fixes it: the
answer `tmplbuild affected` prints and the server's /api/v1/affected returns, in one shape.

Pure: a verified index and checked manifests in, a JSON-able document out. The callers read the bytes (a client
through tmplbuild.client.manifests' cache, `--repo` and the server from a repository directory) and take them only
when their size and sha256 are the ones the signed index lists (`parsed`): nothing is answered from bytes the
index does not vouch for.

A query names a binary package (libssl3) or a source package (openssl: what security advisories name). A package
that matches by its source name is compared at its source version (a binNMU's binary 3.0.11-1~deb12u2+b1 is
built from source 3.0.11-1~deb12u2), one that matches by its binary name at its own version; dpkg's ordering
(tmplbuild.builder.archive.version_compare) decides "below".
"""
from __future__ import annotations

import functools
import re
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from tmplbuild.builder.archive import version_compare
from tmplbuild.client.trust import created_time
from tmplbuild.errors import AuthenticityError, UsageError
from tmplbuild.manifest import Manifest, Package
from tmplbuild.recipe.validate import PACKAGE_EXPECTED, PACKAGE_RE
from tmplbuild.repo import index as idx

# Debian policy 5.6.12: [epoch:]upstream[-revision]; upstream starts with a digit, the revision (after the last
# "-") is not empty. A colon appears only after the epoch.
VERSION_RE = re.compile(r"\A(?:[0-9]+:)?[0-9][A-Za-z0-9.+~-]*(?<!-)\Z")
VERSION_EXPECTED = ("a dpkg version ([epoch:]upstream[-revision]: the epoch digits, the upstream version starting "
                    "with a digit, letters, digits and . + ~ -, e.g. 3.0.15-1~deb12u1)")
ARCH_RE = re.compile(r"\A[a-z0-9][a-z0-9-]*\Z")  # as tmplbuild.client.commands.ARCH
MAX_LENGTH = 256  # a query's name or version: longer ones are not Debian's, and would only be echoed back


@dataclass(frozen=True)
class Query:
    package: str
    fixed: str | None  # None: any version of the package counts
    arch: str | None  # None: every architecture


def query(package: str, fixed: str | None = None, arch: str | None = None) -> Query:
    """The checked query. Raises UsageError naming the value that is not a package name, version or
    architecture."""
    if len(package) > MAX_LENGTH or not PACKAGE_RE.match(package):
        raise UsageError("package name", f"found {package[:80]!r}, expected {PACKAGE_EXPECTED}")
    if fixed is not None and (len(fixed) > MAX_LENGTH or not VERSION_RE.match(fixed)):
        raise UsageError("fixed version", f"found {fixed[:80]!r}, expected {VERSION_EXPECTED}")
    if arch is not None and (len(arch) > MAX_LENGTH or not ARCH_RE.match(arch)):
        raise UsageError("arch", f"found {arch[:80]!r}, expected a Debian architecture name such as amd64")
    return Query(package, fixed, arch)


def entries(index: idx.Index, arch: str | None) -> list[idx.Entry]:
    """The template versions a query examines."""
    return [e for e in index.templates if arch is None or e.arch == arch]


# -- manifests, as the signed index lists them ---------------------------------------------------------------------

def parsed(entry: idx.Entry, data: bytes) -> Manifest:
    """`entry`'s manifest from `data`, which must have the signed size and sha256, parse, and describe `entry`
    (tmplbuild.client.manifests: the one check of manifest bytes against their signed entry). Raises
    AuthenticityError("manifest")."""
    from tmplbuild.client import manifests

    manifests.check(entry.manifest, data)
    return manifests.parse(entry, data)


class ManifestCache:
    """Parsed manifests by their signed sha256, for a process that answers many queries (the server): a repeated
    query reads and parses nothing. It keeps only the manifests the index last asked about lists, so it is bounded
    by one index. Thread-safe; it reads nothing itself."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_sha256: dict[str, Manifest] = {}

    def manifests(self, index: idx.Index, wanted: Iterable[idx.Entry],
                  read: Callable[[idx.Entry], bytes]) -> list[tuple[idx.Entry, Manifest]]:
        """(entry, manifest) for each of `wanted` (entries of `index`), reading with `read(entry)` only the ones
        not cached. Raises AuthenticityError (see `parsed`) and whatever `read` raises; a query that fails keeps
        nothing new."""
        with self._lock:
            known = dict(self._by_sha256)
        out, new = [], {}
        for entry in wanted:
            sha = entry.manifest.sha256
            manifest = known.get(sha) or new.get(sha)
            if manifest is None:
                manifest = new[sha] = parsed(entry, read(entry))
            out.append((entry, manifest))
        listed = {e.manifest.sha256 for e in index.templates}
        with self._lock:
            self._by_sha256 = {sha: m for sha, m in (*self._by_sha256.items(), *new.items()) if sha in listed}
        return out


# -- the answer ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Affected:
    """A template version that carries the package: the matching packages, and whether it is the newest version
    of its name and arch (what `fetch` takes)."""

    name: str
    version: str
    arch: str
    newest: bool
    packages: tuple[Package, ...]

    def doc(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "arch": self.arch, "newest": self.newest,
                "packages": [{"name": p.name, "version": p.version, "arch": p.arch, "source": p.source_name,
                              "source_version": p.source_ver} for p in self.packages]}


def carries(manifest: Manifest, package: str, fixed: str | None) -> tuple[Package, ...]:
    """The installed packages that are `package` (as binary or source) and, with `fixed`, below it."""
    out = []
    for p in manifest.packages:
        if p.source_name == package:
            installed = p.source_ver
        elif p.name == package:
            installed = p.version
        else:
            continue
        try:
            below = fixed is None or version_compare(installed, fixed) < 0
        except ValueError:  # not a dpkg version: a signed manifest, but not one to answer from (and never exit 1)
            raise AuthenticityError("manifest", f"{manifest.name} {manifest.version} {manifest.arch}: package "
                                                f"{p.name} has version {installed[:80]!r}, not a dpkg version") from None
        if below:
            out.append(p)
    return tuple(sorted(out, key=lambda p: (p.name, p.arch)))


def newest(listed: Iterable[idx.Entry]) -> set[tuple[str, str, str]]:
    """The newest version of each name and arch, by `created`, then version, as tmplbuild.client.trust.select
    picks it. Raises AuthenticityError for a `created` that is not a stamp."""
    best: dict[tuple[str, str], idx.Entry] = {}
    for e in listed:
        line = (e.name, e.arch)
        if line not in best or (created_time(e), e.version) > (created_time(best[line]), best[line].version):
            best[line] = e
    return {e.key for e in best.values()}


def find(manifests: Sequence[tuple[idx.Entry, Manifest]], package: str, fixed: str | None) -> list[Affected]:
    """The template versions among `manifests` (every version of each name and arch looked at, so that `newest`
    is right) that carry `package` below `fixed` (None: at all), sorted by name, arch and version (dpkg order).
    Raises AuthenticityError (see `newest`)."""
    top = newest(e for e, _ in manifests)
    out = [Affected(e.name, e.version, e.arch, e.key in top, found)
           for e, m in manifests if (found := carries(m, package, fixed))]
    by_version = functools.cmp_to_key(version_compare)
    return sorted(out, key=lambda a: (a.name, a.arch, by_version(a.version)))


def report(index: idx.Index, q: Query, manifests: Sequence[tuple[idx.Entry, Manifest]]) -> dict[str, Any]:
    """The answer to `q`, as the CLI's --json prints it and /api/v1/affected returns it. Raises AuthenticityError
    (see `newest`)."""
    return {"package": q.package, "fixed": q.fixed, "arch": q.arch, "repo_id": index.repo_id,
            "index_version": index.version, "checked": len(manifests),
            "affected": [a.doc() for a in find(manifests, q.package, q.fixed)]}
