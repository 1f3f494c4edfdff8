"""A Debian package's machine-readable copyright file (DEP-5, copyright-format 1.0) as one SPDX license expression.

The builder puts the answer into an SPDX 2.3 `licenseDeclared` and a CycloneDX `licenses[].expression`. Rule number
one: never guess. A missing, non-machine-readable, undecodable or oversized file, one without a License field in
any Files paragraph, and any License line that does not parse cleanly all give "NOASSERTION"; nothing here raises
on bad input.

Translation: each Files paragraph's (and the header's) first License line is parsed (DEP-5: `and` binds tighter
than `or`; a comma before an operator lowers its precedence; `X with Y exception`), every Debian short name is
mapped through an explicit table to an SPDX id, and every name that is not in the table becomes
`LicenseRef-<name>` (characters outside [A-Za-z0-9.-] replaced by "-"). The operands of every AND and OR are
deduplicated and sorted; the package expression is the AND of the distinct paragraph expressions (a paragraph's own
top-level AND split into its operands), sorted, each OR among them in parentheses. Parsing is a single pass over
the lines with no imports beyond the standard library: the builder calls `package_license` for every package of a
template (about 0.1 ms each).
"""
from __future__ import annotations

import os
import re
import stat
from pathlib import Path

NOASSERTION = "NOASSERTION"

MAX_BYTES = 1 << 20  # a copyright file larger than this is not read (NOASSERTION)
MAX_LINK_HOPS = 16

# The first paragraph's Format field must name the copyright-format 1.0 URL, or one of the older DEP-5 drafts'.
_FORMAT = re.compile(
    r"https?://(?:www\.)?debian\.org/doc/packaging-manuals/copyright-format/1\.0/?"
    r"|https?://dep\.debian\.net/deps/dep5(?:/|\.mdwn)?"
    r"|https?://(?:svn|anonscm)\.debian\.org/(?:wsvn|viewvc)/dep/web/deps/dep5(?:\.mdwn)?(?:\?[\w=&;.-]*)?",
    re.IGNORECASE)

# GNU licences: "NAME" is "version NAME only" and "NAME+" is "NAME or any later version". Keys: Debian short names
# and the (deprecated) SPDX spellings of the same versions, lowercase; values: the SPDX id without -only/-or-later.
_GNU: dict[str, str] = {
    "gpl-1": "GPL-1.0", "gpl-1.0": "GPL-1.0",
    "gpl-2": "GPL-2.0", "gpl-2.0": "GPL-2.0",
    "gpl-3": "GPL-3.0", "gpl-3.0": "GPL-3.0",
    "lgpl-2": "LGPL-2.0", "lgpl-2.0": "LGPL-2.0",
    "lgpl-2.1": "LGPL-2.1",
    "lgpl-3": "LGPL-3.0", "lgpl-3.0": "LGPL-3.0",
    "agpl-3": "AGPL-3.0", "agpl-3.0": "AGPL-3.0",
    "gfdl-1.1": "GFDL-1.1", "gfdl-1.2": "GFDL-1.2", "gfdl-1.3": "GFDL-1.3",  # not GFDL-NIV-*: no SPDX id
}

# Every other known Debian short name (lowercase) -> its SPDX license id. A trailing "+" on these is not mapped
# (SPDX's own "+" operator is not understood by the common tools): such a name becomes a LicenseRef.
_OTHER: dict[str, str] = {
    "apache-1.0": "Apache-1.0", "apache-1.1": "Apache-1.1", "apache-2.0": "Apache-2.0",
    "artistic-2.0": "Artistic-2.0",
    "bsd-2-clause": "BSD-2-Clause", "bsd-3-clause": "BSD-3-Clause", "bsd-4-clause": "BSD-4-Clause",
    "expat": "MIT", "mit": "MIT",
    "isc": "ISC", "zlib": "Zlib",
    "mpl-1.0": "MPL-1.0", "mpl-1.1": "MPL-1.1", "mpl-2.0": "MPL-2.0",
    "cc0-1.0": "CC0-1.0",
    "cc-by-3.0": "CC-BY-3.0", "cc-by-4.0": "CC-BY-4.0", "cc-by-sa-3.0": "CC-BY-SA-3.0", "cc-by-sa-4.0": "CC-BY-SA-4.0",
    "python-2.0": "Python-2.0", "psf-2.0": "PSF-2.0",
    "openssl": "OpenSSL",  # "SSLeay" stays unmapped: SSLeay-standalone is not what Debian means by it
    "x11": "X11",
    "bsl-1.0": "BSL-1.0",
    "epl-1.0": "EPL-1.0", "epl-2.0": "EPL-2.0",
    "cddl-1.0": "CDDL-1.0",
    "unlicense": "Unlicense", "wtfpl": "WTFPL",
    "postgresql": "PostgreSQL", "sleepycat": "Sleepycat",
    "ofl-1.1": "OFL-1.1", "ftl": "FTL", "libpng": "Libpng", "zope-2.1": "ZPL-2.1", "w3c": "W3C", "curl": "curl",
    "beerware": "Beerware", "bzip2-1.0.6": "bzip2-1.0.6",
}
for _base in set(_GNU.values()):  # the current SPDX spellings themselves are known names too
    _OTHER[_base.lower() + "-only"] = _base + "-only"
    _OTHER[_base.lower() + "-or-later"] = _base + "-or-later"
del _base

# SPDX exception ids that a DEP-5 `with <keywords> exception` may name literally (lowercase -> id): the keywords
# (or the keywords and the word "exception", joined with "-") must equal one of these, case-insensitively.
_EXCEPTIONS: dict[str, str] = {e.lower(): e for e in (
    "Autoconf-exception-2.0", "Autoconf-exception-3.0", "GCC-exception-2.0", "GCC-exception-3.1",
    "Classpath-exception-2.0", "Font-exception-2.0", "Libtool-exception", "Bison-exception-2.2", "LLVM-exception",
    "OCaml-LGPL-linking-exception", "openvpn-openssl-exception", "Linux-syscall-note",
)}

_UNSAFE = re.compile(r"[^A-Za-z0-9.-]")
_FIELD = re.compile(r"([^\s:#-][^\s:]*):(.*)")
_PACKAGE = re.compile(r"[a-z0-9][a-z0-9+.-]*")
_OPERATORS = frozenset(("and", "or"))
_EXCEPTION_WORDS = frozenset(("exception", "exceptions"))


class _Unparseable(Exception):
    """A License line that does not parse cleanly (internal: turns into NOASSERTION)."""


def expression(text: str) -> str:
    """The SPDX license expression of a package from the text of its DEP-5 copyright file, or NOASSERTION."""
    try:
        return _expression(text)
    except Exception:  # noqa: BLE001 — the contract: bad input gives NOASSERTION, never an exception
        return NOASSERTION


def package_license(root: Path, name: str) -> str:
    """The SPDX license expression of the package `name` (`name:arch` allowed) from
    `<root>/usr/share/doc/<name>/copyright` of the Debian tree at `root`, or NOASSERTION. Symlinks are resolved
    inside `root` as if it were `/`, at most MAX_LINK_HOPS of them; nothing outside `root` is read."""
    try:
        if not isinstance(name, str):
            return NOASSERTION
        name = name.split(":", 1)[0]
        if not _PACKAGE.fullmatch(name):
            return NOASSERTION
        path = _resolve_inside(os.fspath(root), ["usr", "share", "doc", name, "copyright"])
        if path is None:
            return NOASSERTION
        data = _read_regular(path)
        if data is None:
            return NOASSERTION
        return expression(data.decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, TypeError):
        return NOASSERTION


# -- the file inside the tree ------------------------------------------------------------------------------------

def _resolve_inside(root: str, parts: list[str]) -> str | None:
    """The path of `parts` (relative to `root`) with every symlink resolved as if `root` were `/`: absolute link
    targets start again at `root`, `..` stops at `root`. None after MAX_LINK_HOPS links. OSError if a component
    is missing or not a directory."""
    pending = list(reversed(parts))  # a stack: the next component is at the end
    done: list[str] = []  # resolved components, none of them a symlink
    hops = 0
    while pending:
        part = pending.pop()
        if part in ("", "."):
            continue
        if part == "..":
            if done:
                done.pop()
            continue
        path = os.path.join(root, *done, part)
        if stat.S_ISLNK(os.lstat(path).st_mode):
            hops += 1
            if hops > MAX_LINK_HOPS:
                return None
            target = os.readlink(path)
            if target.startswith("/"):
                done = []
            pending.extend(reversed(target.split("/")))
        else:
            done.append(part)
    return os.path.join(root, *done)


def _read_regular(path: str) -> bytes | None:
    """The contents of the regular file at `path` (not followed if it is a symlink; a FIFO does not block), or
    None if it is not a regular file or is larger than MAX_BYTES."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_BYTES:
            return None
        chunks, size = [], 0
        while size <= MAX_BYTES:
            chunk = os.read(fd, MAX_BYTES + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        return None if size > MAX_BYTES else b"".join(chunks)
    finally:
        os.close(fd)


# -- the paragraphs ----------------------------------------------------------------------------------------------

def _paragraphs(text: str) -> list[dict[str, str]]:
    """The deb822 paragraphs of `text`, each as {lowercase field name: first line of the value, stripped}.
    Continuation lines are skipped (only first lines matter here). Raises _Unparseable on a line that is neither
    a field nor a continuation, a continuation without a field, or a field twice in one paragraph."""
    paragraphs: list[dict[str, str]] = []
    current: dict[str, str] | None = None
    for line in text.splitlines():
        if not line or line.isspace():
            current = None
            continue
        first = line[0]
        if first == " " or first == "\t":
            if current is None:
                raise _Unparseable("continuation line outside a field")
            continue
        if first == "#":  # a comment line (deb822 tools skip them)
            continue
        match = _FIELD.fullmatch(line)
        if match is None:
            raise _Unparseable("not a field")
        key = match.group(1).lower()
        if current is None:
            current = {}
            paragraphs.append(current)
        if key in current:
            raise _Unparseable("field twice in one paragraph")
        current[key] = match.group(2).strip()
    return paragraphs


def _expression(text: str) -> str:
    if not isinstance(text, str) or len(text) > MAX_BYTES:
        return NOASSERTION
    if text.startswith("\ufeff"):
        text = text[1:]
    if "\x00" in text:
        return NOASSERTION
    try:
        paragraphs = _paragraphs(text)
    except _Unparseable:
        return NOASSERTION
    if not paragraphs or not _FORMAT.fullmatch(paragraphs[0].get("format", "")):
        return NOASSERTION
    header, rest = paragraphs[0], paragraphs[1:]
    if "files" in header:
        return NOASSERTION  # a header that is also a Files paragraph: not DEP-5
    lines: list[str] = []
    if header.get("license"):  # optional; an empty first line there introduces a prose summary, not a licence
        lines.append(header["license"])
    files = 0
    for paragraph in rest:
        if "files" not in paragraph:
            continue  # a stand-alone License paragraph (a licence text) or a comment: not a licence of files
        if "license" not in paragraph:
            return NOASSERTION  # files whose licence is not stated: a partial answer would be a guess
        files += 1
        lines.append(paragraph["license"])
    if not files:
        return NOASSERTION
    terms: dict[str, bool] = {}  # rendered term -> is an OR
    try:
        for line in lines:
            node = _normal(_parse(line))
            # AND is associative and idempotent: split a paragraph's top-level AND to collapse duplicates
            for part in (node[1] if node[0] == "AND" else [node]):
                terms[_render(part)] = part[0] == "OR"
    except _Unparseable:
        return NOASSERTION
    if len(terms) == 1:
        return next(iter(terms))
    return " AND ".join(sorted(f"({term})" if is_or else term for term, is_or in terms.items()))


# -- one License line --------------------------------------------------------------------------------------------
# A node is ("LEAF", "spdx term") or ("AND" | "OR", [nodes]).

_COMMA, _LPAREN, _RPAREN = ",", "(", ")"


def _tokens(line: str) -> list[str]:
    for ch in (_COMMA, _LPAREN, _RPAREN):
        line = line.replace(ch, f" {ch} ")
    return line.split()


def _parse(line: str) -> tuple:
    """The tree of one License first line. Raises _Unparseable on anything but a clean expression."""
    tokens = _tokens(line)
    if not tokens:
        raise _Unparseable("no licence name")
    parser = _Parser(tokens)
    node = parser.comma_list()
    if parser.pos != len(tokens):
        raise _Unparseable("trailing tokens")
    return node


class _Parser:
    """comma_list := or_expr ("," op or_expr)*  (every op after a comma the same)
    or_expr := and_expr ("or" and_expr)*;  and_expr := primary ("and" primary)*
    primary := "(" comma_list ")" | NAME ["with" KEYWORD... ["exception" | "exceptions"]]"""

    def __init__(self, tokens: list[str]) -> None:
        self.tokens, self.pos = tokens, 0

    def peek(self) -> str | None:
        return self.tokens[self.pos].lower() if self.pos < len(self.tokens) else None

    def comma_list(self) -> tuple:
        items, op = [self.or_expr()], None
        while self.peek() == _COMMA:
            self.pos += 1
            after = self.peek()
            if after not in _OPERATORS or (op is not None and after != op):
                raise _Unparseable("a comma not followed by the same operator as the other commas")
            op = after
            self.pos += 1
            items.append(self.or_expr())
        return items[0] if op is None else _node(op.upper(), items)

    def or_expr(self) -> tuple:
        items = [self.and_expr()]
        while self.peek() == "or":
            self.pos += 1
            items.append(self.and_expr())
        return _node("OR", items)

    def and_expr(self) -> tuple:
        items = [self.primary()]
        while self.peek() == "and":
            self.pos += 1
            items.append(self.primary())
        return _node("AND", items)

    def primary(self) -> tuple:
        token = self.peek()
        if token == _LPAREN:
            self.pos += 1
            node = self.comma_list()
            if self.peek() != _RPAREN:
                raise _Unparseable("unbalanced parentheses")
            self.pos += 1
            return node
        if token is None or token in _OPERATORS or token in (_COMMA, _RPAREN, "with"):
            raise _Unparseable("a licence name expected")
        name = self.tokens[self.pos]
        self.pos += 1
        if self.peek() != "with":
            return ("LEAF", _license_id(name))
        self.pos += 1
        words: list[str] = []
        while True:
            token = self.peek()
            if token is None or token in _OPERATORS or token in (_COMMA, _LPAREN, _RPAREN, "with"):
                break
            words.append(self.tokens[self.pos])
            self.pos += 1
            if token in _EXCEPTION_WORDS:
                break
        if not words or words[0].lower() in _EXCEPTION_WORDS:
            raise _Unparseable("`with` without an exception name")
        return ("LEAF", _with(name, words))


def _node(op: str, items: list[tuple]) -> tuple:
    if len(items) == 1:
        return items[0]
    flat: list[tuple] = []
    for item in items:
        flat.extend(item[1] if item[0] == op else [item])
    return (op, flat)


def _normal(node: tuple) -> tuple:
    """`node` with nested same operators flattened, duplicate operands dropped and operands sorted (AND and OR are
    associative, commutative and idempotent: the meaning is unchanged, the output deterministic)."""
    if node[0] == "LEAF":
        return node
    op, operands = node[0], {}
    for child in node[1]:
        child = _normal(child)
        for operand in (child[1] if child[0] == op else [child]):
            operands[_render(operand)] = operand
    if len(operands) == 1:
        return next(iter(operands.values()))
    return (op, [operands[key] for key in sorted(operands)])


def _render(node: tuple) -> str:
    if node[0] == "LEAF":
        return node[1]
    return f" {node[0]} ".join(_render(c) if c[0] == "LEAF" else f"({_render(c)})" for c in node[1])


def _known(name: str) -> str | None:
    """The SPDX license id of a Debian short name, or None."""
    lower = name.lower()
    if lower in _OTHER:
        return _OTHER[lower]
    if lower in _GNU:
        return _GNU[lower] + "-only"
    if lower.endswith("+") and lower[:-1] in _GNU:
        return _GNU[lower[:-1]] + "-or-later"
    return None


def _license_ref(name: str) -> str:
    return "LicenseRef-" + _UNSAFE.sub("-", name)


def _license_id(name: str) -> str:
    if not name.rstrip("+"):
        raise _Unparseable("an empty licence name")
    return _known(name) or _license_ref(name)


def _with(name: str, words: list[str]) -> str:
    """`<name> with <words>` (the words ending in "exception", usually) as `<id> WITH <exception id>` when both
    are known, otherwise as one LicenseRef of the whole term."""
    if not name.rstrip("+"):
        raise _Unparseable("an empty licence name")
    license_id = _known(name)
    if license_id is not None:
        candidates = ["-".join(words)]
        if len(words) > 1 and words[-1].lower() == "exception":
            candidates.append("-".join(words[:-1]))
        for candidate in candidates:
            exception = _EXCEPTIONS.get(candidate.lower())
            if exception is not None:
                return f"{license_id} WITH {exception}"
    return _license_ref(" ".join([name, "with", *words]))
