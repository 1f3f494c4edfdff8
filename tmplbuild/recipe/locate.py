"""Map a recipe field path (`template.architectures[1]`, `scripts[0].stage`) to its line in the raw TOML text.

tomllib returns plain values without positions, yet an error that names no line sends the user hunting through
the file. So this module re-scans the text once with a tolerant, minimal TOML tokenizer: table and
array-of-tables headers (with per-array counters, matching the loader's 0-based indices), keys, array items and
inline tables. It only runs on text tomllib has already accepted, so it never needs to report syntax errors.
"""
from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tmplbuild.errors import RecipeError

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
# One trailing component of a field path: `[3]`, `.name`, `name` or a quoted key.
_LAST_COMPONENT = re.compile(r'\A(.*?)(?:\[\d+\]|\.?(?:[A-Za-z0-9_-]+|"(?:[^"\\]|\\.)*"))\Z', re.DOTALL)
_SCALAR_END = frozenset(",]}#\n\r")


def render_key(key: str) -> str:
    """One path component as printed in errors: bare if TOML would allow it bare, else JSON-quoted, so a key
    holding a newline or a dot can neither break the one-line message nor be mistaken for two components."""
    return key if _BARE_KEY.fullmatch(key) else json.dumps(key)


def join_field(prefix: str, key: str) -> str:
    return f"{prefix}.{render_key(key)}" if prefix else render_key(key)


def parent_field(field: str) -> str:
    """`a.b[2]` -> `a.b` -> `a` -> ``."""
    match = _LAST_COMPONENT.match(field)
    return match.group(1) if match else ""


class Locator:
    """Line numbers (1-based) of fields in one recipe file's text."""

    def __init__(self, text: str) -> None:
        self._lines: dict[str, int] = {}
        self._literals: dict[str, str] = {}
        try:
            _Scanner(text, self._lines, self._literals).run()
        except (IndexError, ValueError):
            pass  # text tomllib accepted but this scanner misread: keep the partial map rather than fail

    def line(self, field: str) -> int | None:
        """The line of `field`, else of its nearest enclosing field that appears in the text, else None."""
        while field:
            if field in self._lines:
                return self._lines[field]
            field = parent_field(field)
        return None

    def literal(self, field: str) -> str | None:
        """The raw source text of a scalar (not string) value, e.g. `0o644` versus `644`."""
        return self._literals.get(field)


class _Scanner:
    def __init__(self, text: str, lines: dict[str, int], literals: dict[str, str]) -> None:
        self.s = text
        self.i = 0
        self.line = 1
        self.lines = lines
        self.literals = literals
        self.counters: dict[str, int] = {}

    def _advance(self, n: int) -> None:
        self.line += self.s.count("\n", self.i, self.i + n)
        self.i += n

    def _advance_to(self, j: int) -> None:
        self._advance(j - self.i)

    def _record(self, field: str) -> None:
        self.lines.setdefault(field, self.line)

    def _skip_blank(self, newlines: bool) -> None:
        while self.i < len(self.s):
            c = self.s[self.i]
            if c in " \t" or (newlines and c in "\r\n"):
                self._advance(1)
            elif c == "#":
                end = self.s.find("\n", self.i)
                self._advance_to(len(self.s) if end < 0 else end)
            else:
                return

    def run(self) -> None:
        prefix = ""
        while True:
            self._skip_blank(newlines=True)
            if self.i >= len(self.s):
                return
            if self.s.startswith("[[", self.i):
                self._advance(2)
                name = self._key_path("")
                index = self.counters.get(name, 0)
                self.counters[name] = index + 1
                prefix = f"{name}[{index}]"
                self._record(prefix)
                self._advance_to(self.s.index("]]", self.i) + 2)
            elif self.s[self.i] == "[":
                self._advance(1)
                prefix = self._key_path("")
                self._record(prefix)
                self._advance_to(self.s.index("]", self.i) + 1)
            else:
                self._key_value(prefix)

    def _key_value(self, prefix: str) -> None:
        field = self._key_path(prefix)
        self._record(field)
        self._skip_blank(newlines=False)
        if self.s[self.i] != "=":
            raise ValueError("expected '='")
        self._advance(1)
        self._skip_blank(newlines=False)
        self._value(field)

    def _key_path(self, prefix: str) -> str:
        """Reads a possibly dotted, possibly quoted key and returns it appended to `prefix`."""
        field = prefix
        while True:
            self._skip_blank(newlines=False)
            c = self.s[self.i]
            if c in "\"'":
                start = self.i
                self._string()
                raw = self.s[start : self.i]
                try:
                    key = json.loads(raw) if c == '"' else raw[1:-1]
                except ValueError:  # a TOML-only escape such as \e; the quoted text is close enough
                    key = raw[1:-1]
            else:
                match = _BARE_KEY.match(self.s, self.i)
                if not match:
                    raise ValueError("expected a key")
                key = match.group(0)
                self._advance_to(match.end())
            field = join_field(field, key)
            self._skip_blank(newlines=False)
            if self.i < len(self.s) and self.s[self.i] == ".":
                self._advance(1)
                continue
            return field

    def _string(self) -> None:
        quote = self.s[self.i]
        if self.s.startswith(quote * 3, self.i):
            j = self._find_close(quote * 3, self.i + 3)
            # `""""` closes with one quote of content: up to two extra quotes belong to the string.
            extra = 0
            while extra < 2 and self.s.startswith(quote, j + 3 + extra):
                extra += 1
            self._advance_to(j + 3 + extra)
            return
        self._advance_to(self._find_close(quote, self.i + 1) + 1)

    def _find_close(self, delimiter: str, j: int) -> int:
        escapes = delimiter[0] == '"'  # literal strings have no escapes
        while True:
            if j >= len(self.s):
                raise ValueError("unterminated string")
            if escapes and self.s[j] == "\\":
                j += 2
            elif self.s.startswith(delimiter, j):
                return j
            else:
                j += 1

    def _value(self, field: str) -> None:
        c = self.s[self.i]
        if c in "\"'":
            self._string()
        elif c == "[":
            self._advance(1)
            index = 0
            while True:
                self._skip_blank(newlines=True)
                if self.s[self.i] == "]":
                    self._advance(1)
                    return
                item = f"{field}[{index}]"
                self._record(item)
                self._value(item)
                self._skip_blank(newlines=True)
                if self.s[self.i] == ",":
                    self._advance(1)
                    index += 1
                elif self.s[self.i] != "]":
                    raise ValueError("expected ',' or ']'")
        elif c == "{":
            self._advance(1)
            while True:
                self._skip_blank(newlines=False)
                if self.s[self.i] == "}":
                    self._advance(1)
                    return
                if self.s[self.i] == ",":
                    self._advance(1)
                    continue
                self._key_value(field)
        else:
            j = self.i
            while j < len(self.s) and self.s[j] not in _SCALAR_END:
                j += 1
            self.literals.setdefault(field, self.s[self.i : j].strip())
            self._advance_to(j)


def quote(value: object, limit: int = 60, prefix: str = "") -> str:
    """A value as shown in a one-line message: quoted, non-printable characters escaped, long values cut."""
    text = value if isinstance(value, str) else repr(value)
    shown = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text[:limit]).replace('"', '\\"')
    if not isinstance(value, str):
        return prefix + shown
    return f'{prefix}"{shown}..."' if len(text) > limit else f'{prefix}"{shown}"'


def type_name(value: object) -> str:
    """TOML's name for a parsed value's type, so messages speak the user's language, not Python's."""
    names = {bool: "boolean", int: "integer", float: "float", str: "string", list: "array", dict: "table"}
    return names.get(type(value), "date/time")


@dataclass(frozen=True)
class Source:
    """One recipe file: values parsed from it remember it, so an error points at the file that set the value."""

    path: Path
    locator: Locator

    @property
    def dir(self) -> Path:
        return self.path.parent

    def error(self, field: str, message: str, line: int | None = None) -> RecipeError:
        return RecipeError(str(self.path), line or self.locator.line(field), field, message)


@dataclass(frozen=True)
class Val:
    """A raw TOML value with its provenance: file and field path."""

    value: Any
    src: Source
    field: str

    def error(self, message: str) -> RecipeError:
        return self.src.error(self.field, message)

    def found(self, expected: str) -> RecipeError:
        """For a value of the right type outside its grammar."""
        return self.error(f"found {quote(self.value)}, expected {expected}")

    def wrong_type(self, expected: str) -> RecipeError:
        value = self.value
        shown = {True: " true", False: " false"}[value] if isinstance(value, bool) else (
            quote(value, prefix=" ") if isinstance(value, (str, int, float)) else "")
        return self.error(f"found {type_name(value)}{shown}, expected {expected}")

    def items(self) -> Iterator[Val]:
        return (Val(v, self.src, f"{self.field}[{i}]") for i, v in enumerate(self.value))
