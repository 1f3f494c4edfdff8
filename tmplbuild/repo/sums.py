"""SHA256SUMS, the per-directory list that `sha256sum -c` and `gpgv` users check without tmplbuild: one writer
and one strict reader, used by publish, prune, the convergence clean-up, `repo verify` and the server's upload
check.

The format is coreutils' text mode: one `<sha256>  <file name>` line per template file and manifest of the
version directory (every architecture), sorted by name, `\n`-terminated. The signed index decides what a
directory's SHA256SUMS must say (`expected`); `difference` names the first line that disagrees."""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path

from tmplbuild.repo import index as idx

NAME, SIG = "SHA256SUMS", "SHA256SUMS.gpg"
LINE = re.compile(r"\A([0-9a-f]{64})  ([A-Za-z0-9][A-Za-z0-9._+~-]*)\Z")


class SumsError(ValueError):
    """A SHA256SUMS that is not one: the message names the line."""


def expected(entries: Iterable[idx.Entry]) -> dict[str, str]:
    """File name -> sha256 of every file and manifest the index lists for these entries (one directory's)."""
    return {Path(r.path).name: r.sha256 for e in entries for r in (*e.files, e.manifest)}


def render(sums: Mapping[str, str]) -> bytes:
    """The file's bytes for name -> sha256."""
    return "".join(f"{digest}  {name}\n" for name, digest in sorted(sums.items())).encode()


def parse(text: bytes) -> dict[str, str]:
    """Name -> sha256. Raises SumsError for bytes that are not UTF-8, a malformed line or a name listed twice."""
    try:
        lines = text.decode("utf-8").splitlines()
    except UnicodeDecodeError:
        raise SumsError("not UTF-8 text") from None
    found: dict[str, str] = {}
    for line in lines:
        m = LINE.match(line)
        if not m or m.group(2) in found:
            raise SumsError(f"malformed or repeated line {line[:100]!r}")
        found[m.group(2)] = m.group(1)
    return found


def difference(text: bytes, want: Mapping[str, str]) -> str | None:
    """None when `text` lists exactly `want`; else what is wrong (unreadable, or the first name that differs)."""
    try:
        found = parse(text)
    except SumsError as exc:
        return str(exc)
    if found == dict(want):
        return None
    differ = sorted(set(found.items()) ^ set(want.items()))
    return f"first difference: {differ[0][0]}"


def matches(path: Path, want: Mapping[str, str]) -> bool:
    """The SHA256SUMS at `path` lists exactly `want`. Raises nothing (a missing file does not match)."""
    try:
        return difference(path.read_bytes(), want) is None
    except OSError:
        return False
