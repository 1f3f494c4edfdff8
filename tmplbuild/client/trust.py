"""The client's trust decisions, pure: bytes and the remembered state in, verified objects out. No I/O here
beyond the Verifier's own gpg run; downloading, state and files belong to the callers.

The order is DESIGN.md's "Client checks, in this order", and each check raises its own typed error. Checks 2
to 6 are tmplbuild.repo.accept's (the one index acceptance module, shared with the server and `repo verify`):
  1 size caps (index 64 MiB, signature 64 KiB)                        TransportError    5
  2 the signature over the exact index bytes (Verifier: the pinned    AuthenticityError 3
    index key; for a root-pinned source tmplbuild.repo.root.
    RootVerifier: a threshold of the newest trusted root's online
    keys, that root walked to and checked fresh first, see
    tmplbuild.client.updater)
  3 schema (index.parse: strict JSON, integer ranges, lifetime)       AuthenticityError 3
  4 repo_id equals the pinned one (config, else the root's, else      AuthenticityError 3
    first use)
  5 not expired (now >= expires is expired), not generated more than
    5 minutes in the future                                           FreshnessError    4
  6 version not below the last seen; same version, same bytes         FreshnessError    4
    (for a root source the bar is forgotten when the root's online
    keys changed since the last index: TUF 5.3.11)
  7 the signed entry is what was asked for                            UsageError 2 (absent) / AuthenticityError 3
  9 size, sha256 and sha512 of the downloaded file                    AuthenticityError 3
(8, the capped download, and 10, the rename, are tmplbuild.client.download's.)
"""
from __future__ import annotations

from dataclasses import dataclass

from tmplbuild.errors import AuthenticityError, TransportError, UsageError
from tmplbuild.repo import accept
from tmplbuild.repo import index as idx
from tmplbuild.repo.accept import MAX_CLOCK_SKEW, Seen, SignatureChecker, TrustedIndex  # noqa: F401 (re-exported)

INDEX_CAP, SIGNATURE_CAP = idx.INDEX_CAP, idx.SIGNATURE_CAP
FORMATS = idx.FORMATS


@dataclass(frozen=True)
class Selected:
    entry: idx.Entry
    ref: idx.FileRef

    @property
    def filename(self) -> str:
        return self.ref.path.rsplit("/", 1)[1]


def check_cap(what: str, size: int, cap: int) -> None:
    """Check 1. Raises TransportError("download size") when `size` exceeds `cap`."""
    if size > cap:
        raise TransportError("download size", f"{what}: more than {cap} bytes, expected at most {cap}")


def stamp(t: float) -> str:
    return idx.stamp(t)


def check_index(data: bytes, signature: bytes, verifier: SignatureChecker, *, pinned_repo_id: str | None,
                last: Seen | None, now: float | None = None) -> TrustedIndex:
    """Checks 1 to 6 on one answer of one mirror. `pinned_repo_id`: the admin's pin (config), if any; else the
    repo_id recorded in `last` is the pin; with neither, this is first use and any repo_id is accepted (the
    caller records it only once the whole run passed). Raises TransportError, AuthenticityError,
    FreshnessError as listed in the module docstring."""
    check_cap("index.json", len(data), INDEX_CAP)
    check_cap("index.json.asc", len(signature), SIGNATURE_CAP)
    return accept.accept_index(data, signature, verifier, pinned_repo_id=pinned_repo_id, last=last, now=now)


def file_name(name: str, version: str, arch: str, fmt: str) -> str:
    """What pct and pveam expect: <name>_<version>_<arch>.<format>."""
    return f"{name}_{version}_{arch}.{fmt}"


def created_time(entry: idx.Entry) -> int:
    try:
        return idx.parse_stamp(entry.created)
    except ValueError:
        raise AuthenticityError("index schema", f"{entry.name} {entry.version} {entry.arch}: created "
                                                f"{entry.created!r}, expected YYYY-MM-DDTHH:MM:SSZ") from None


def check_entry(entry: idx.Entry, ref: idx.FileRef) -> Selected:
    """The file an entry points at must be named after the entry, in its directory, in a known format.
    Raises AuthenticityError("entry")."""
    if ref.format not in FORMATS:
        raise AuthenticityError("entry", f"{entry.name} {entry.version} {entry.arch}: format {ref.format!r}, "
                                         f"expected one of {', '.join(FORMATS)}")
    expected = file_name(entry.name, entry.version, entry.arch, ref.format)
    if ref.path != f"{entry.directory}/{expected}":
        raise AuthenticityError("entry", f"file {ref.path}, expected {entry.directory}/{expected}")
    if not ref.sha512:
        raise AuthenticityError("entry", f"{ref.path}: no sha512 in the index")
    return Selected(entry, ref)


def did_you_mean(name: str, index: idx.Index) -> str:
    """" (did you mean NAME?)" for a template name the index does not have, when one is close, else ""."""
    import difflib

    names = sorted({e.name for e in index.templates})
    if name in names:
        return ""
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.75)
    return f" (did you mean {' or '.join(close)}?)" if close else ""


def select(index: idx.Index, name: str, *, version: str | None, arch: str, fmt: str | None) -> Selected:
    """Check 7: the entry asked for, the newest by `created` (then version) unless `version` is given, and its
    file in `fmt` (default: the entry's primary file). Raises UsageError("template") when there is none,
    AuthenticityError("entry") when the signed entry does not match what was asked for."""
    candidates = [e for e in index.templates if e.name == name and e.arch == arch
                  and (version is None or e.version == version)]
    if fmt is not None:
        candidates = [e for e in candidates if any(f.format == fmt for f in e.files)]
    if not candidates:
        available = sorted({e.version for e in index.templates if e.name == name and e.arch == arch})
        arches = sorted({e.arch for e in index.templates if e.name == name
                         and (version is None or e.version == version)})
        if available:
            hint = f" (versions for {arch}: {', '.join(available)})"
        elif arches:
            hint = f" (its architectures{'' if version is None else f' in {version}'}: {', '.join(arches)}; give --arch)"
        else:
            hint = did_you_mean(name, index)
        asked = " ".join([name, version or "(any version)", arch] + ([fmt] if fmt else []))
        raise UsageError("template", f"no template {asked} in the index{hint}")
    entry = max(candidates, key=lambda e: (created_time(e), e.version))
    ref = next(f for f in entry.files if f.format == fmt) if fmt else entry.files[0]
    if (entry.name, entry.arch) != (name, arch) or (version is not None and entry.version != version):
        raise AuthenticityError("entry", f"{entry.name} {entry.version} {entry.arch}, expected {name} "
                                         f"{version or '(any version)'} {arch}")
    return check_entry(entry, ref)


def find_file(index: idx.Index, filename: str) -> Selected | None:
    """The entry file whose name is `filename` (for `verify FILE`), checked like `select`'s; None if absent."""
    for entry in index.templates:
        for ref in entry.files:
            if ref.path.rsplit("/", 1)[1] == filename:
                return check_entry(entry, ref)
    return None


def check_file(ref: idx.FileRef, size: int, sha256: str, sha512: str, what: str) -> None:
    """Check 9 (tmplbuild.repo.accept.check_file). Raises AuthenticityError naming the first of size, sha256,
    sha512 that differs; the entry was checked to carry a sha512 (check_entry)."""
    accept.check_file(ref, size, sha256, sha512, what)
