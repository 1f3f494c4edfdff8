"""One strict JSON reader for every document tmplbuild acts on: the signed index, the manifests it points at,
and the client's own state file.

Python's json module is lenient where a signed document must not be: a duplicated key silently keeps the last
value (so two readers of the same signed bytes can disagree), NaN, Infinity and 1e400 are read as floats, and
deep nesting ends in RecursionError (exit 1, "a bug") instead of a refusal. Here:

- the bytes must be UTF-8 (no BOM), and no string may hold a lone surrogate (`"\\ud800"`: it cannot be printed
  or written back as UTF-8);
- a key may appear once per object;
- NaN, Infinity, -Infinity and numbers that overflow a float are refused;
- nesting ([ and { together) is at most `max_depth` deep. The depth is measured on the bytes before the parser
  runs (strings removed, then innermost bracket pairs removed once per level, with C-speed bytes operations),
  so no input, however deep, reaches a recursion limit.

Every refusal is a StrictJSONError (a ValueError) whose message starts with `what`; callers turn it into their
own typed error (an index: AuthenticityError "index schema"; the state file: LocalIOError)."""
from __future__ import annotations

import json
import math
import re
from typing import Any

MAX_DEPTH = 32  # an index is 5 deep (index, templates, entry, files, file); a manifest about as much

_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


class StrictJSONError(ValueError):
    """A document refused by `loads`. str() is one line: `<what>: <reason>`."""


def depth_ok(data: bytes, max_depth: int) -> bool:
    """True when no bracket in `data` (outside strings) is nested deeper than `max_depth`. Malformed bracket
    structure (unbalanced, or [ closed by }) also answers False. Linear in len(data) per level, at most
    `max_depth` levels."""
    brackets = _STRING.sub(b"", data).translate(None, _NOT_BRACKETS)
    for level in range(max_depth):
        if not brackets:
            return True
        shorter = brackets.replace(b"[]", b"").replace(b"{}", b"")
        if len(shorter) == len(brackets):
            # No innermost pair left: what remains is unbalanced or mismatched. Each removed level and each
            # remaining bracket adds at most one level, so when that sum is small the parser may run (and name
            # the syntax error); otherwise refuse here.
            return level + len(brackets) <= max_depth
        brackets = shorter
    return not brackets


def _pairs(what: str):
    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        doc: dict[str, Any] = {}
        for key, value in pairs:
            if key in doc:
                raise StrictJSONError(f"{what}: duplicate key {key!r}")
            doc[key] = value
        return doc
    return hook


def _constant(what: str):
    def hook(name: str) -> Any:
        raise StrictJSONError(f"{what}: {name} is not a JSON number")
    return hook


def _float(what: str):
    def hook(text: str) -> float:
        value = float(text)
        if not math.isfinite(value):
            raise StrictJSONError(f"{what}: number {text[:40]} overflows a float")
        return value
    return hook


def _check_strings(value: Any, what: str) -> None:
    """Lone surrogates (from \\ud800-style escapes) in any key or string. Recursion is bounded by max_depth."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise StrictJSONError(f"{what}: a string holds a lone surrogate escape") from None
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_strings(k, what)
            _check_strings(v, what)
    elif isinstance(value, list):
        for v in value:
            _check_strings(v, what)


def loads(data: bytes, *, what: str, max_depth: int = MAX_DEPTH) -> Any:
    """The document in `data`, read strictly (see the module docstring). `what` names it in messages (a file
    name). Raises StrictJSONError, and nothing else for any input."""
    if not isinstance(data, (bytes, bytearray)):
        raise TypeError("strictjson.loads takes bytes")
    try:
        text = bytes(data).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise StrictJSONError(f"{what}: not UTF-8 (byte {exc.start})") from None
    if text.startswith("\ufeff"):
        raise StrictJSONError(f"{what}: starts with a byte order mark")
    if not depth_ok(bytes(data), max_depth):
        raise StrictJSONError(f"{what}: nested deeper than {max_depth} levels (or unbalanced brackets)")
    try:
        doc = json.loads(text, object_pairs_hook=_pairs(what), parse_constant=_constant(what),
                         parse_float=_float(what))
    except StrictJSONError:
        raise
    except RecursionError:  # not reachable after the depth check; kept so that the promise holds regardless
        raise StrictJSONError(f"{what}: nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, and int() of more than sys.get_int_max_str_digits() digits
        raise StrictJSONError(f"{what}: not JSON ({exc})") from None
    _check_strings(doc, what)
    return doc
