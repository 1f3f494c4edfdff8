"""Grammars for every recipe value that later reaches debootstrap, apt or a shell, and the typed checkers the
loader applies to raw TOML values.

The `*_problem` helpers are public because the builder checks values from the command line and the environment
(a mirror URL, an extra package) against the same rules as recipe values. Each returns None when the value is
fine, else a phrase starting with "expected ..." that reads well after `found "VALUE", `.
"""
from __future__ import annotations

import base64
import binascii
import ipaddress
import os
import re
import urllib.parse
from collections.abc import Callable, Collection, Sequence
from pathlib import Path

from tmplbuild.errors import RecipeError
from tmplbuild.recipe.locate import Val, join_field, quote

Errors = list[RecipeError] | None  # where a check records what it refuses and goes on; None: it raises the first

# All anchored with \A...\Z: `$` would accept a trailing newline, which would split a sources.list line.
NAME_RE = re.compile(r"\A[a-z0-9][a-z0-9.+-]*\Z")  # no "_": it separates name, version and arch in file names
DISTRIBUTION_RE = NAME_RE
RELEASE_RE = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9.+~-]*\Z")
SUITE_RE = re.compile(r"\A[a-z0-9][a-z0-9.+-]*\Z")
SUITE_MAX_LENGTH = 64
VERSION_RE = re.compile(r"\A[0-9A-Za-z][0-9A-Za-z.+~-]*\Z")
COMPONENT_RE = re.compile(r"\A[a-z0-9][a-z0-9-]*\Z")
PACKAGE_RE = re.compile(r"\A[a-z0-9][a-z0-9+.-]+\Z")  # Debian policy 5.6.1
REPOSITORY_NAME_RE = re.compile(r"\A[a-z0-9][a-z0-9.-]*\Z")  # becomes a file name under /etc/apt
DESCRIPTION_MAX_LENGTH = 200
DESCRIPTION_EXPECTED = f"a single line of at most {DESCRIPTION_MAX_LENGTH} printable characters"

NAME_EXPECTED = "a name of lowercase letters, digits and + - . (no underscore), starting with a letter or digit"
RELEASE_EXPECTED = "a release of letters, digits and + - . ~, starting with a letter or digit"
VERSION_EXPECTED = "a version of letters, digits and + - . ~ (no underscore), starting with a letter or digit"
COMPONENT_EXPECTED = "an archive component of lowercase letters, digits and - (e.g. main)"
PACKAGE_EXPECTED = "a Debian package name (lowercase letters, digits and + - ., at least 2 characters)"
SUITE_EXPECTED = f"a suite name (lowercase letters, digits and + - ., at most {SUITE_MAX_LENGTH} characters)"
MODE_EXPECTED = 'a permission mode: an octal string such as "0644", or an integer such as 0o644, at most 0o7777'
REPOSITORY_NAME_EXPECTED = "a repository name of lowercase letters, digits and - ., starting with a letter or digit"

# Characters RFC 3986 allows, minus the shell-significant sub-delimiters (! $ & ' ( ) * ;) that no mirror needs.
_URL_CHARS_RE = re.compile(r"\A[A-Za-z0-9._~:/?#\[\]@%+=,-]*\Z")
_HOST_RE = re.compile(r"\A(?:[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\])\Z")
_BAD_PERCENT_RE = re.compile(r"%(?![0-9A-Fa-f]{2})")


def url_problem(value: str, *, schemes: Collection[str] = ("http", "https", "file")) -> str | None:
    """None if `value` is a plain http(s) URL with a host, or a file:/// URL; else what is wrong with it."""
    names = [f"{s}://" for s in schemes]
    allowed = " or ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)
    if not isinstance(value, str) or not value:
        return f"expected a URL starting with {allowed}"
    if any(c.isspace() or not c.isprintable() for c in value):
        return "expected a URL without whitespace or control characters"
    if any(c in value for c in "\"'`"):
        return "expected a URL without quotes"
    scheme, sep, _ = value.partition("://")
    if not sep or scheme not in schemes:
        return f"expected a URL starting with {allowed}"
    if "?" in value or "#" in value:
        return "expected a URL without a query (?) or fragment (#)"
    if not _URL_CHARS_RE.fullmatch(value):
        bad = next(c for c in value if not _URL_CHARS_RE.fullmatch(c))
        return f"expected a URL without {quote(bad)} (percent-encode it)"
    if _BAD_PERCENT_RE.search(value):
        return "expected % only in percent-escapes such as %20"
    try:
        parts = urllib.parse.urlsplit(value)
        port = parts.port
    except ValueError as e:
        return f"expected a well-formed URL ({e})"
    if "@" in parts.netloc:
        return "expected a URL without credentials (user:password@)"
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            return "expected file:///absolute/path (a file URL has no host)"
        if not parts.path.startswith("/"):
            return "expected file:///absolute/path"
        return None
    host = parts.netloc.rsplit(":", 1)[0] if not parts.netloc.endswith("]") else parts.netloc
    if not host or not _HOST_RE.fullmatch(host):
        return f"expected a host name after {scheme}://"
    if port == 0:
        return "expected a port between 1 and 65535"
    return None


# apt-cacher-ng and apt-cacher listen on 3142; a path starting with a host name (`/deb.example.org/debian`)
# or apt-cacher-ng's `/HTTPS///` is how a caching proxy is addressed, never how a mirror is.
APT_CACHE_PORTS = frozenset({3142})
_PROXY_PATH_RE = re.compile(r"\A/(?:HTTPS///|[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}(?::\d+)?/)")


def template_source_problem(value: str) -> str | None:
    """None if `value` can go into a template's sources.list: an http(s) mirror every container can reach.
    A loopback, link-local, file: or dot-less host, or an apt cache/proxy address works on the building host
    at best, and gives every container made from the template a broken apt."""
    problem = url_problem(value, schemes=("http", "https"))
    if problem:
        return problem + " (a template's sources must be reachable from every container, so not file:)"
    parts = urllib.parse.urlsplit(value)
    host = (parts.hostname or "").lower()
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    if host == "localhost" or host.endswith(".localhost") or (ip and (ip.is_loopback or ip.is_link_local
                                                                    or ip.is_unspecified)):
        return "expected a mirror every container can reach, not a loopback or link-local address"
    if ip is None and "." not in host:
        return "expected a fully qualified mirror host name (a container cannot resolve a bare host name)"
    if parts.port in APT_CACHE_PORTS or _PROXY_PATH_RE.match(parts.path or "/"):
        return "expected a Debian mirror, not an apt cache or proxy address (port 3142, or a host name in the path)"
    return None


def template_source_url(v: Val) -> str:
    if not isinstance(v.value, str):
        raise v.wrong_type("a string")
    problem = template_source_problem(v.value)
    if problem:
        raise v.error(f"found {quote(v.value)}, {problem}")
    return v.value.rstrip("/")


def package_name_problem(value: str) -> str | None:
    return None if isinstance(value, str) and PACKAGE_RE.fullmatch(value) else PACKAGE_EXPECTED


def suite_problem(value: str) -> str | None:
    ok = isinstance(value, str) and len(value) <= SUITE_MAX_LENGTH and SUITE_RE.fullmatch(value)
    return None if ok else SUITE_EXPECTED


_ARMOR_BEGIN = b"-----BEGIN PGP PUBLIC KEY BLOCK-----"
_ARMOR_BLOCK_RE = re.compile(rb"-----BEGIN PGP PUBLIC KEY BLOCK-----\r?\n(.*?)-----END PGP PUBLIC KEY BLOCK-----",
                             re.DOTALL)
_KEYBOX_MAGIC = b"KBXf"  # at offset 8 of a GnuPG keybox (pubring.kbx)
_PUBLIC_KEY_TAG = 6
_SECRET_KEY_TAGS = frozenset({5, 7})  # secret key, secret subkey


def key_armored(data: bytes) -> bool:
    return data.lstrip().startswith(_ARMOR_BEGIN)


def packet_tags(data: bytes) -> list[int] | None:
    """The tags of the OpenPGP packets in binary `data` (RFC 4880 4.2, headers only), or None if it is not a
    sequence of whole packets. Reads no key material; cheap enough for any file a recipe may name."""
    tags: list[int] = []
    i = 0
    try:
        while i < len(data):
            ctb = data[i]
            if not ctb & 0x80:
                return None
            if ctb & 0x40:  # new format: one, two or five length octets; partial lengths never occur in keys
                tag, first = ctb & 0x3F, data[i + 1]
                if first < 192:
                    length, i = first, i + 2
                elif first < 224:
                    length, i = ((first - 192) << 8) + data[i + 2] + 192, i + 3
                elif first == 255:
                    length, i = int.from_bytes(data[i + 2 : i + 6], "big"), i + 6
                else:
                    return None
            else:  # old format: the low two bits give 1, 2 or 4 length octets, or 3: up to the end
                tag, size = (ctb >> 2) & 0x0F, ctb & 0x03
                if size == 3:
                    length, i = len(data) - i - 1, i + 1
                else:
                    n = 1 << size
                    if i + 1 + n > len(data):
                        return None
                    length, i = int.from_bytes(data[i + 1 : i + 1 + n], "big"), i + 1 + n
            if tag == 0 or i + length > len(data):
                return None
            tags.append(tag)
            i += length
    except IndexError:
        return None
    return tags


def _dearmor(data: bytes) -> bytes | None:
    """The packets of every public key block in armored `data`, or None if a block's body is not base64."""
    out = b""
    for block in _ARMOR_BLOCK_RE.findall(data):
        header, _, body = block.replace(b"\r\n", b"\n").partition(b"\n\n")
        if not body and b":" not in header:  # no armor headers and no blank line: the block is all body
            body = header
        lines = [ln.strip() for ln in body.split(b"\n") if ln.strip() and not ln.startswith(b"=")]
        try:
            out += base64.b64decode(b"".join(lines), validate=True)
        except binascii.Error:
            return None
    return out


def key_problem(data: bytes, *, armor_ok: bool = True) -> str | None:
    """None for an OpenPGP public key or keyring (armored, if `armor_ok`, or binary): whole packets, the first a
    public key. A secret key is refused outright, wherever it sits in the file: it would be copied into the
    template and shipped to every container made from it."""
    if b"PRIVATE KEY" in data:
        return "found a PRIVATE key, expected a public key (never put a secret key into a recipe)"
    if not data.strip():
        return "found an empty file, expected an OpenPGP public key"
    armored = key_armored(data)
    if armored and not armor_ok:
        return ("found an ASCII-armored key, expected a binary OpenPGP keyring (gpgv reads no armor;"
                " convert it with gpg --dearmor)")
    if data[8:12] == _KEYBOX_MAGIC:
        return "found a GnuPG keybox, expected an OpenPGP keyring (write one with gpg --export KEY)"
    packets = _dearmor(data) if armored else data
    tags = packet_tags(packets) if packets else None
    if tags is None:
        what = "an armored public key block whose packets" if armored else "a file whose bytes"
        return f"found {what} are not whole OpenPGP packets, expected an OpenPGP public key"
    if _SECRET_KEY_TAGS & set(tags):
        return "found a secret key packet, expected public keys only (never put a secret key into a recipe)"
    if tags[0] != _PUBLIC_KEY_TAG:
        return f"found OpenPGP packet type {tags[0]} first, expected a public key (type {_PUBLIC_KEY_TAG})"
    return None


def report(error: RecipeError, errors: Errors) -> None:
    """Raise `error`; or, when every error of a recipe is being collected (`errors` is a list), record it so the
    caller goes on without the refused value."""
    if errors is None:
        raise error
    errors.append(error)


def table(v: Val, allowed: Sequence[str], expected: str = "a table", *, errors: Errors = None) -> dict[str, Val]:
    """The entries of a TOML table, refusing unknown keys: a typo must not silently drop a setting. Collecting
    (`errors`), each unknown key is recorded and left out."""
    if not isinstance(v.value, dict):
        raise v.wrong_type(expected)
    out: dict[str, Val] = {}
    for key, value in v.value.items():
        child = Val(value, v.src, join_field(v.field, key))
        if key not in allowed:
            report(child.error(f"unknown field; expected one of: {', '.join(allowed)}"), errors)
            continue
        out[key] = child
    return out


def text(v: Val, *, one_line: bool = False, non_empty: bool = True) -> str:
    if not isinstance(v.value, str):
        raise v.wrong_type("a string")
    if non_empty and not v.value.strip():
        raise v.error("found an empty string, expected some text")
    if "\0" in v.value:  # cannot pass through argv, a file name or most shells
        raise v.error("found a NUL character, expected text")
    if one_line and not v.value.isprintable():
        raise v.found("a single line without control characters")
    return v.value


def description(val: Val) -> str:
    value = text(val, one_line=True)
    if len(value) > DESCRIPTION_MAX_LENGTH:
        raise val.error(f"found {len(value)} characters, expected {DESCRIPTION_EXPECTED}")
    return value


def refuse_repeats(keys: list[str], entries: list[Val], attr: str, what: str, *, errors: Errors = None) -> None:
    """Within one file a repeated repository name or destination is a mistake (across files it is an override).
    Collecting (`errors`), every repeat is recorded."""
    first: dict[str, int] = {}
    for i, key in enumerate(keys):
        if key in first:
            report(Val(key, entries[i].src, f"{entries[i].field}.{attr}").error(
                f"found {quote(key)} twice (also in {entries[first[key]].field}), expected each {what} once"), errors)
            continue
        first[key] = i


def required(fields: dict[str, Val], key: str, entry: Val, expected: str) -> Val:
    if key not in fields:
        raise entry.src.error(f"{entry.field}.{key}", f"missing required field, expected {expected}")
    return fields[key]


def grammar(regex: re.Pattern[str], expected: str, max_length: int | None = None) -> Callable[[Val], str]:
    def check(v: Val) -> str:
        if not isinstance(v.value, str):
            raise v.wrong_type("a string")
        if not regex.fullmatch(v.value) or (max_length is not None and len(v.value) > max_length):
            raise v.found(expected)
        return v.value

    return check


def one_of(choices: Collection[str]) -> Callable[[Val], str]:
    def check(v: Val) -> str:
        if not isinstance(v.value, str):
            raise v.wrong_type("a string")
        if v.value not in choices:
            raise v.found(f"one of: {', '.join(sorted(choices))}")
        return v.value

    return check


def url(schemes: Collection[str]) -> Callable[[Val], str]:
    def check(v: Val) -> str:
        if not isinstance(v.value, str):
            raise v.wrong_type("a string")
        problem = url_problem(v.value, schemes=schemes)
        if problem:
            raise v.error(f"found {quote(v.value)}, {problem}")
        return v.value

    return check


def unique_list(v: Val, item: Callable[[Val], str], what: str, *, non_empty: bool = True,
                errors: Errors = None) -> tuple[str, ...]:
    """An array of checked strings without repeats; `what` names one item for messages. Collecting (`errors`),
    each refused item is recorded and left out: every misspelt package of a list is named in one run."""
    if not isinstance(v.value, list):
        raise v.wrong_type(f"an array of {what}s")
    if non_empty and not v.value:
        raise v.error(f"found an empty array, expected at least one {what}")
    seen: dict[str, int] = {}
    for index, child in enumerate(v.items()):
        try:
            value = item(child)
            if value in seen:
                raise child.error(f"found {quote(value)} twice (also at [{seen[value]}]), expected each {what} once")
        except RecipeError as error:
            report(error, errors)
            continue
        seen[value] = index
    return tuple(seen)


SYSTEM_KEYRINGS = Path("/usr/share/keyrings")  # the archive keyrings Debian's packages install
_PATH_SHOWN = 1024  # a refused path is shown whole: the user must see which one


def local_path(v: Val, *, system_dir: Path | None = None) -> Path:
    """A path from the recipe, relative to the directory of the file that set it, and inside that directory once
    symlinks are resolved: a recipe must not publish an arbitrary file of the building host. `system_dir`
    also admits an absolute path into that directory (the bootstrap keyring)."""
    raw = text(v)
    if not raw.isprintable():
        raise v.found("a file path without control characters")
    path = v.src.dir / raw
    try:
        base, resolved = v.src.dir.resolve(), path.resolve()
    except (OSError, RuntimeError) as e:  # RuntimeError: a symlink loop
        raise v.error(f"found {quote(raw, _PATH_SHOWN)}, which cannot be resolved ({e}); expected a file path") from e
    if resolved.is_relative_to(base):
        return path
    if system_dir is not None and Path(raw).is_absolute() and resolved.is_relative_to(system_dir.resolve()):
        return path
    shown = "" if resolved == Path(os.path.normpath(path)) else f" (resolving to {resolved})"
    inside = f", or an absolute path into {system_dir}" if system_dir is not None else ""
    raise v.error(f"{quote(raw, _PATH_SHOWN)}{shown} is outside the recipe's directory {base}; expected a path"
                  f" inside it{inside}")


MAX_FILE_BYTES = 64 * 1024 * 1024  # a recipe input larger than this is a mistake, not a config file


def read_input(v: Val, what: str, *, system_dir: Path | None = None) -> tuple[Path, bytes]:
    """Reads a file the recipe names, at load time, so the input hash covers its bytes."""
    path = local_path(v, system_dir=system_dir)
    try:
        if not path.exists():
            raise v.error(f"{what} file not found: {path}")
        if not path.is_file():
            raise v.error(f"{what} file is not a regular file: {path}")
        if path.stat().st_size > MAX_FILE_BYTES:
            raise v.error(f"{what} file is larger than {MAX_FILE_BYTES} bytes: {path}")
        return path, path.read_bytes()
    except OSError as e:
        raise v.error(f"cannot read {what} file {path}: {e.strerror or e}") from e


# A file placed there would land on the kernel's or the container manager's file systems, mounted over the
# template's own tree when a container runs: it can only be a mistake (or an attempt to write to the host).
FORBIDDEN_DEST_ROOTS = ("dev", "proc", "sys")


def dest_path(val: Val) -> str:
    """A normalised absolute path inside the tree; `..` is refused, not resolved, as it can only be a mistake."""
    value = text(val)
    if not value.isprintable():
        raise val.found("an absolute path without control characters")
    if not value.startswith("/"):
        raise val.found("an absolute path (starting with /)")
    parts = [p for p in value.split("/") if p]
    if any(p in (".", "..") for p in parts):
        raise val.found("a path without . or .. components")
    if not parts:
        raise val.found("the path of a file, not /")
    if parts[0] in FORBIDDEN_DEST_ROOTS:
        roots = ", ".join(f"/{r}" for r in FORBIDDEN_DEST_ROOTS)
        raise val.found(f"a path outside {roots} (kernel and device file systems, mounted over the template)")
    return "/" + "/".join(parts)


def file_mode(val: Val) -> int:
    value = val.value
    if isinstance(value, str):
        if not re.fullmatch(r"[0-7]{1,4}", value):
            raise val.found(MODE_EXPECTED)
        return int(value, 8)
    if not isinstance(value, int) or isinstance(value, bool):
        raise val.wrong_type(MODE_EXPECTED)
    if not 0 <= value <= 0o7777:
        raise val.error(f"found {value}, expected {MODE_EXPECTED}")
    literal = val.src.locator.literal(val.field) or ""
    # `mode = 644` is decimal 644 = 0o1204 in TOML: almost certainly meant as octal, so refuse to guess.
    if value > 7 and re.fullmatch(r"\+?[0-9_]+", literal):
        raise val.error(f"found {literal} (decimal, which is 0o{value:o}), expected {MODE_EXPECTED}")
    return value
