"""Remotes: where a repository is served and which key must have signed it.

Two files, read with stdlib tomllib: the system one (`/etc/tmplbuild/remotes.toml`) and the user's
(`~/.config/tmplbuild/remotes.toml`, or `$TMPLBUILD_CONFIG_DIR/remotes.toml`); a user entry replaces a system
entry of the same name. `$TMPLBUILD_SYSTEM_CONFIG_DIR` moves the system directory (tests, staging hosts).

    [remotes.example]
    urls = ["https://templates.example.org/repo", "https://mirror.example.net/templates"]
    key = "keys/example.asc"          # relative to the directory of this file
    fingerprints = ["0123...40 hex"]
    repo_id = "example-templates"     # optional; otherwise pinned on first use (see state)

Keys are never fetched from the network or taken from ~/.gnupg: `remote add` copies the key file the admin
got out of band into `keys/NAME.asc` next to the config, after checking the pinned fingerprints are primary
keys in it and that those keys are strong enough (keys.STRENGTH_RULE: RSA of at least 2048 bits, ECC on
ed25519/NIST/Brainpool curves; DSA and ElGamal refused), the same checks every later run makes.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from tmplbuild.files import atomic_write
from tmplbuild.errors import LocalIOError, UsageError
from tmplbuild.recipe.validate import url_problem
from tmplbuild.sign.keys import normalise_fingerprint

FILE_NAME = "remotes.toml"
REMOTE_NAME = re.compile(r"\A[a-z0-9][a-z0-9_-]{0,63}\Z")
REMOTE_NAME_EXPECTED = "a name of lowercase letters, digits, - and _ (at most 64), starting with a letter or digit"
REPO_ID = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")
SCHEMES = ("http", "https")
_FIELDS = {"urls", "key", "fingerprints", "repo_id"}


@dataclass(frozen=True)
class Remote:
    name: str
    urls: tuple[str, ...]  # mirrors, tried in order
    key: Path  # the pinned public key file (absolute)
    fingerprints: tuple[str, ...]  # pinned primary fingerprints, normalised
    repo_id: str | None = None  # pinned by the admin; None: pinned on first use, in the state
    origin: Path | None = None  # the config file it came from

    def key_material(self) -> bytes:
        """The pinned key file's bytes. Raises UsageError if it cannot be read."""
        try:
            return self.key.read_bytes()
        except OSError as exc:
            where = f" (configured in {self.origin})" if self.origin else ""
            raise UsageError("key", f"remote {self.name}: cannot read key file {self.key}: {exc.strerror}{where}") \
                from None


def system_dir() -> Path:
    return Path(os.environ.get("TMPLBUILD_SYSTEM_CONFIG_DIR") or "/etc/tmplbuild")


def user_dir() -> Path:
    if os.environ.get("TMPLBUILD_CONFIG_DIR"):
        return Path(os.environ["TMPLBUILD_CONFIG_DIR"])
    return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "tmplbuild"


def check_name(name: str) -> str:
    if not REMOTE_NAME.match(name):
        raise UsageError("remote name", f"found {name!r}, expected {REMOTE_NAME_EXPECTED}")
    return name


def check_urls(urls: list[str] | tuple[str, ...], where: str = "url") -> tuple[str, ...]:
    """Mirror URLs, each a plain http(s) URL (no credentials, query or fragment). Raises UsageError."""
    if not urls:
        raise UsageError(where, "no URL given, expected at least one http:// or https:// URL")
    for url in urls:
        problem = url_problem(url, schemes=SCHEMES)
        if problem:
            raise UsageError(where, f"found {url!r}, {problem}")
    return tuple(dict.fromkeys(u.rstrip("/") for u in urls))


def check_repo_id(value: str, where: str = "repo id") -> str:
    if not REPO_ID.match(value):
        raise UsageError(where, f"found {value!r}, expected letters, digits and . _ - (at most 128)")
    return value


def load_file(path: Path) -> dict[str, Remote]:
    """The remotes of one file; {} when it does not exist. Raises UsageError naming the file and field."""
    import tomllib  # only where a remotes file is read: `fetch --url` needs none

    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise UsageError("config", f"{path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError("config", f"{path}: {exc}") from None
    unknown = set(doc) - {"remotes"}
    if unknown:
        raise UsageError("config", f"{path}: unknown table or key {sorted(unknown)[0]!r}, expected [remotes.NAME]")
    table = doc.get("remotes", {})
    if not isinstance(table, dict):
        raise UsageError("config", f"{path}: remotes: expected a table of [remotes.NAME]")
    return {name: _remote(path, name, value) for name, value in table.items()}


def _remote(path: Path, name: str, doc: object) -> Remote:
    where = f"{path}: remotes.{name}"
    if not REMOTE_NAME.match(name):
        raise UsageError("config", f"{where}: expected {REMOTE_NAME_EXPECTED}")
    if not isinstance(doc, dict):
        raise UsageError("config", f"{where}: expected a table")
    unknown = set(doc) - _FIELDS
    if unknown:
        raise UsageError("config", f"{where}.{sorted(unknown)[0]}: unknown field, expected one of "
                                   f"{', '.join(sorted(_FIELDS))}")
    urls, key, fprs, repo_id = doc.get("urls"), doc.get("key"), doc.get("fingerprints"), doc.get("repo_id")
    if not isinstance(urls, list) or not all(isinstance(u, str) for u in urls):
        raise UsageError("config", f"{where}.urls: expected a list of URLs")
    if not isinstance(key, str) or not key:
        raise UsageError("config", f"{where}.key: expected the path of the pinned public key file")
    if not isinstance(fprs, list) or not fprs or not all(isinstance(f, str) for f in fprs):
        raise UsageError("config", f"{where}.fingerprints: expected a list of 40-hex-digit fingerprints")
    if repo_id is not None and not isinstance(repo_id, str):
        raise UsageError("config", f"{where}.repo_id: expected a string")
    try:
        checked_urls = check_urls(urls, f"{where}.urls")
    except UsageError as exc:
        raise UsageError("config", str(exc)) from None
    return Remote(
        name=name, urls=checked_urls, key=(path.parent / key).resolve(),
        fingerprints=tuple(normalise_fingerprint(f, f"config {where}.fingerprints") for f in fprs),
        repo_id=check_repo_id(repo_id, f"config {where}.repo_id") if repo_id is not None else None, origin=path)


def load_all() -> dict[str, Remote]:
    """System remotes overlaid by the user's (same name: the user's entry wins, whole)."""
    remotes = load_file(system_dir() / FILE_NAME)
    remotes.update(load_file(user_dir() / FILE_NAME))
    return remotes


def get(name: str | None) -> Remote:
    """The remote `name`; without a name, the only configured one. Raises UsageError."""
    remotes = load_all()
    if name is None:
        if len(remotes) == 1:
            return next(iter(remotes.values()))
        if not remotes:
            raise UsageError("remote", "no remote configured: run `tmplbuild remote add NAME URL --key FILE "
                                       "--fingerprint FPR`, or give --url URL --key FILE --fingerprint FPR")
        raise UsageError("remote", f"several remotes configured ({', '.join(sorted(remotes))}): choose one with "
                                   "--remote NAME")
    if name not in remotes:
        raise UsageError("remote", f"no remote named {name!r} (configured: {', '.join(sorted(remotes)) or 'none'})")
    return remotes[name]


# -- writing -----------------------------------------------------------------------------------------------------

def _toml_string(value: str) -> str:
    out = []
    for c in value:
        if c in '"\\':
            out.append("\\" + c)
        elif c == "\n":
            out.append("\\n")
        elif c == "\t":
            out.append("\\t")
        elif ord(c) < 0x20 or ord(c) == 0x7F:
            out.append(f"\\u{ord(c):04X}")
        else:
            out.append(c)
    return '"' + "".join(out) + '"'


def dumps(remotes: dict[str, Remote], directory: Path) -> str:
    """The TOML text of `remotes`; key paths inside `directory` are written relative to it."""
    lines = ["# tmplbuild remotes: written by `tmplbuild remote add`; keys are pinned, never fetched.", ""]
    for name in sorted(remotes):
        r = remotes[name]
        key = r.key
        try:
            key_text = str(key.relative_to(directory.resolve()))
        except ValueError:
            key_text = str(key)
        lines.append(f"[remotes.{_toml_string(name)}]")
        lines.append("urls = [" + ", ".join(_toml_string(u) for u in r.urls) + "]")
        lines.append(f"key = {_toml_string(key_text)}")
        lines.append("fingerprints = [" + ", ".join(_toml_string(f) for f in r.fingerprints) + "]")
        if r.repo_id:
            lines.append(f"repo_id = {_toml_string(r.repo_id)}")
        lines.append("")
    return "\n".join(lines)


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Configuration must survive a crash whole: a durable atomic write. Raises LocalIOError."""
    atomic_write(path, data, mode=mode, durable=True)


def add(name: str, urls: list[str], key_file: Path, fingerprints: list[str], repo_id: str | None,
        system: bool) -> tuple[Remote, Path]:
    """Check and record a remote: the URLs, that every pinned fingerprint is a primary key in the key file (and
    that it holds public keys only), that each pinned key and its usable signing subkeys meet the strength rule,
    then copy the key to keys/NAME.asc and rewrite the config atomically.
    Returns the remote and the config file. Raises UsageError (exit 2), LocalIOError (exit 7)."""
    from tmplbuild.sign.verify import Verifier

    check_name(name)
    checked_urls = check_urls(urls)
    pins = tuple(dict.fromkeys(normalise_fingerprint(f, "fingerprint") for f in fingerprints))
    if repo_id is not None:
        check_repo_id(repo_id)
    try:
        material = key_file.read_bytes()
    except OSError as exc:
        raise UsageError("key", f"cannot read {key_file}: {exc.strerror}") from None
    # The same checks the verifier makes on every run: fails with "pinned fingerprint ... is not among the
    # supplied public keys", a refusal of secret key material, or "key strength: pinned key FPR is RSA 1024
    # bits: ..." for a key below the strength rule.
    with Verifier(material, pins):
        pass
    directory = system_dir() if system else user_dir()
    path = directory / FILE_NAME
    existing = load_file(path)
    if name in existing:
        raise UsageError("remote", f"{name} already exists in {path}: `tmplbuild remote remove {name}"
                                   f"{' --system' if system else ''}` first")
    try:
        (directory / "keys").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LocalIOError("config", f"cannot create {directory / 'keys'}: {exc.strerror}") from None
    key_path = directory / "keys" / f"{name}.asc"
    write_atomic(key_path, material)
    remote = Remote(name=name, urls=checked_urls, key=key_path.resolve(), fingerprints=pins, repo_id=repo_id,
                    origin=path)
    existing[name] = remote
    write_atomic(path, dumps(existing, directory).encode())
    return remote, path


def remove(name: str, system: bool) -> Path:
    """Drop a remote from one config file (its copied key too). Raises UsageError when it is not there."""
    directory = system_dir() if system else user_dir()
    path = directory / FILE_NAME
    existing = load_file(path)
    if name not in existing:
        raise UsageError("remote", f"no remote named {name!r} in {path}")
    removed = existing.pop(name)
    write_atomic(path, dumps(existing, directory).encode())
    if removed.key == (directory / "keys" / f"{name}.asc").resolve():
        removed.key.unlink(missing_ok=True)
    return path
