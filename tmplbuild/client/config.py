"""Remotes: where a repository is served and which key must have signed it (the index key, or a root of trust).

Two files, read with stdlib tomllib: the system one (`/etc/tmplbuild/remotes.toml`) and the user's
(`~/.config/tmplbuild/remotes.toml`, or `$TMPLBUILD_CONFIG_DIR/remotes.toml`); a user entry replaces a system
entry of the same name. `$TMPLBUILD_SYSTEM_CONFIG_DIR` moves the system directory (tests, staging hosts).

    [remotes.example]
    urls = ["https://templates.example.org/repo", "https://mirror.example.net/templates"]
    key = "keys/example.asc"          # relative to the directory of this file
    fingerprints = ["0123...40 hex"]
    repo_id = "example-templates"     # optional; otherwise pinned on first use (see state)

A remote pins either the index signing key (above: `key` + `fingerprints`, the mode from before roots) or the
repository's root of trust (tmplbuild.repo.root), never both:

    [remotes.example]
    urls = ["https://templates.example.org/repo"]
    root_keys = ["0123...40 hex", "4567...40 hex"]   # pinned root key fingerprints
    root = "keys/example.root.json"                 # optional: a root document obtained out of band

With `root_keys` only, the client trusts the first root of the repository signed by a threshold of its root keys
that are pinned, and follows the chain of roots from there; with `root`, that document is trusted as given and
the chain is followed from it. Either way the newest trusted root is then kept in the client state.

Keys are never fetched from the network or taken from ~/.gnupg: `remote add` copies the key file the admin
got out of band into `keys/NAME.asc` next to the config, after checking the pinned fingerprints are primary
keys in it and that those keys are strong enough (keys.STRENGTH_RULE: RSA of at least 2048 bits, ECC on
ed25519/NIST/Brainpool curves; DSA and ElGamal refused), the same checks every later run makes. A root document
is copied to `keys/NAME.root.json` the same way, after a strict parse.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tmplbuild.files import atomic_write
from tmplbuild.errors import AuthenticityError, LocalIOError, UsageError
from tmplbuild.recipe.validate import url_problem
from tmplbuild.sign.keys import normalise_fingerprint

if TYPE_CHECKING:
    from tmplbuild.repo.root import Root

FILE_NAME = "remotes.toml"
REMOTE_NAME = re.compile(r"\A[a-z0-9][a-z0-9_-]{0,63}\Z")
REMOTE_NAME_EXPECTED = "a name of lowercase letters, digits, - and _ (at most 64), starting with a letter or digit"
REPO_ID = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")
SCHEMES = ("http", "https")
_FIELDS = {"urls", "key", "fingerprints", "repo_id", "root_keys", "root"}
_LEGACY_FIELDS = ("key", "fingerprints")
_ROOT_FIELDS = ("root_keys", "root")


@dataclass(frozen=True)
class Remote:
    name: str
    urls: tuple[str, ...]  # mirrors, tried in order
    key: Path | None  # the pinned public key file (absolute); None for a root-pinned remote
    fingerprints: tuple[str, ...]  # pinned primary fingerprints, normalised; () for a root-pinned remote
    repo_id: str | None = None  # pinned by the admin; None: pinned on first use, in the state
    origin: Path | None = None  # the config file it came from
    root_keys: tuple[str, ...] = ()  # pinned root key fingerprints, normalised; () for a legacy remote
    root: Path | None = None  # a root document obtained out of band (absolute), optional

    @property
    def pins_root(self) -> bool:
        """True for a root-pinned remote, False for one pinned to the index key (the mode from before roots)."""
        return bool(self.root_keys)

    def _where(self) -> str:
        return f" (configured in {self.origin})" if self.origin else ""

    def key_material(self) -> bytes:
        """The pinned key file's bytes. Raises UsageError if it cannot be read (or the remote pins a root)."""
        if self.key is None:
            raise UsageError("key", f"remote {self.name}: pins a root (root_keys), not an index key file"
                                    f"{self._where()}")
        try:
            return self.key.read_bytes()
        except OSError as exc:
            raise UsageError("key", f"remote {self.name}: cannot read key file {self.key}: {exc.strerror}"
                                    f"{self._where()}") from None

    def root_doc(self) -> Root | None:
        """The root document the admin configured (parsed strictly, trusted as given), or None. Raises
        UsageError when it cannot be read or does not parse: it is configuration, not something served."""
        if self.root is None:
            return None
        try:
            data = self.root.read_bytes()
        except OSError as exc:
            raise UsageError("root", f"remote {self.name}: cannot read root file {self.root}: {exc.strerror}"
                                     f"{self._where()}") from None
        return parse_root(data, f"remote {self.name}: {self.root}{self._where()}")


def parse_root(data: bytes, what: str) -> Root:
    """A root document given out of band, parsed with tmplbuild.repo.root.parse. Raises UsageError("root")
    naming `what` and the field for a malformed one."""
    from tmplbuild.repo import root as rootdoc

    try:
        return rootdoc.parse(data)
    except AuthenticityError as exc:
        raise UsageError("root", f"{what}: {exc.message}") from None


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
    legacy = [f for f in _LEGACY_FIELDS if f in doc]
    rooted = [f for f in _ROOT_FIELDS if f in doc]
    if legacy and rooted:
        raise UsageError("config", f"{where}.{rooted[0]}: found with {legacy[0]}, expected either key + "
                                   "fingerprints (the index key) or root_keys (a root of trust), not both")
    if repo_id is not None and not isinstance(repo_id, str):
        raise UsageError("config", f"{where}.repo_id: expected a string")
    try:
        checked_urls = check_urls(urls, f"{where}.urls")
    except UsageError as exc:
        raise UsageError("config", str(exc)) from None
    checked_repo_id = check_repo_id(repo_id, f"config {where}.repo_id") if repo_id is not None else None
    if rooted:
        root_keys, root = doc.get("root_keys"), doc.get("root")
        if not isinstance(root_keys, list) or not root_keys or not all(isinstance(f, str) for f in root_keys):
            raise UsageError("config", f"{where}.root_keys: expected a list of 40-hex-digit root key fingerprints")
        if root is not None and (not isinstance(root, str) or not root):
            raise UsageError("config", f"{where}.root: expected the path of a root document")
        return Remote(
            name=name, urls=checked_urls, key=None, fingerprints=(), repo_id=checked_repo_id, origin=path,
            root_keys=tuple(dict.fromkeys(normalise_fingerprint(f, f"config {where}.root_keys") for f in root_keys)),
            root=(path.parent / root).resolve() if root is not None else None)
    if not isinstance(key, str) or not key:
        raise UsageError("config", f"{where}.key: expected the path of the pinned public key file (or root_keys: "
                                   "the fingerprints of a pinned root)")
    if not isinstance(fprs, list) or not fprs or not all(isinstance(f, str) for f in fprs):
        raise UsageError("config", f"{where}.fingerprints: expected a list of 40-hex-digit fingerprints")
    return Remote(
        name=name, urls=checked_urls, key=(path.parent / key).resolve(),
        fingerprints=tuple(normalise_fingerprint(f, f"config {where}.fingerprints") for f in fprs),
        repo_id=checked_repo_id, origin=path)


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
            raise UsageError("remote", "no remote configured: run `tmplbuild remote add NAME URL --root-key FPR` "
                                       "(or --key FILE --fingerprint FPR), or give --url URL --root-key FPR")
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
    def relative(p: Path) -> str:
        try:
            return str(p.relative_to(directory.resolve()))
        except ValueError:
            return str(p)

    for name in sorted(remotes):
        r = remotes[name]
        lines.append(f"[remotes.{_toml_string(name)}]")
        lines.append("urls = [" + ", ".join(_toml_string(u) for u in r.urls) + "]")
        if r.pins_root:
            lines.append("root_keys = [" + ", ".join(_toml_string(f) for f in r.root_keys) + "]")
            if r.root is not None:
                lines.append(f"root = {_toml_string(relative(r.root))}")
        else:
            assert r.key is not None
            lines.append(f"key = {_toml_string(relative(r.key))}")
            lines.append("fingerprints = [" + ", ".join(_toml_string(f) for f in r.fingerprints) + "]")
        if r.repo_id:
            lines.append(f"repo_id = {_toml_string(r.repo_id)}")
        lines.append("")
    return "\n".join(lines)


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Configuration must survive a crash whole: a durable atomic write. Raises LocalIOError."""
    atomic_write(path, data, mode=mode, durable=True)


def add(name: str, urls: list[str], key_file: Path | None, fingerprints: list[str] | None, repo_id: str | None,
        system: bool, *, root_keys: list[str] | None = None, root_file: Path | None = None) -> tuple[Remote, Path]:
    """Check and record a remote, pinned one of two ways:

    - the index key (`key_file` + `fingerprints`): that every pinned fingerprint is a primary key in the key file
      (and that it holds public keys only), that each pinned key and its usable signing subkeys meet the strength
      rule; the key is copied to keys/NAME.asc;
    - a root of trust (`root_keys`, and/or `root_file`, a root document obtained out of band): the fingerprints
      are normalised; the document is parsed strictly and copied to keys/NAME.root.json, and when no root key
      is given its root keys are pinned. A client state root left under this name by an earlier remote is
      forgotten (the new pins rule).

    Then the config is rewritten atomically. Returns the remote and the config file. Raises UsageError (exit 2),
    LocalIOError (exit 7)."""
    check_name(name)
    checked_urls = check_urls(urls)
    rooted = bool(root_keys) or root_file is not None
    if rooted and (key_file is not None or fingerprints):
        raise UsageError("remote", "give --key FILE --fingerprint FPR (pin the index key) or --root-key FPR / "
                                   "--root FILE (pin the root), not both")
    if not rooted and (key_file is None or not fingerprints):
        raise UsageError("remote", "give --root-key FPR (pin the root; or --root FILE), or --key FILE with "
                                   "--fingerprint FPR (pin the index key)")
    if repo_id is not None:
        check_repo_id(repo_id)
    material, root_data, pins, root_pins = b"", b"", (), ()
    if rooted:
        root_pins = tuple(dict.fromkeys(normalise_fingerprint(f, "root key") for f in root_keys or ()))
        if root_file is not None:
            try:
                root_data = root_file.read_bytes()
            except OSError as exc:
                raise UsageError("root", f"cannot read {root_file}: {exc.strerror}") from None
            doc = parse_root(root_data, str(root_file))
            if not root_pins:
                root_pins = doc.root.keys
            elif not set(root_pins) & set(doc.root.keys):
                raise UsageError("root key", f"{', '.join(root_pins)}: none is a root key of {root_file} (root "
                                             f"{doc.version}: {', '.join(doc.root.keys)}), expected at least one")
    else:
        from tmplbuild.sign.verify import Verifier

        assert key_file is not None and fingerprints
        pins = tuple(dict.fromkeys(normalise_fingerprint(f, "fingerprint") for f in fingerprints))
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
    if rooted:
        root_path = None
        if root_file is not None:
            root_path = directory / "keys" / f"{name}.root.json"
            write_atomic(root_path, root_data)
            root_path = root_path.resolve()
        from tmplbuild.client import state

        # The remote's own state from before identity keys: a remote added anew starts from its own pins (and its
        # root file). What the client learned about the repository itself (its identity's state) stays: the
        # newer of that and the root file given is trusted.
        state.forget_root(state.key_for_remote(name))
        remote = Remote(name=name, urls=checked_urls, key=None, fingerprints=(), repo_id=repo_id, origin=path,
                        root_keys=root_pins, root=root_path)
    else:
        key_path = directory / "keys" / f"{name}.asc"
        write_atomic(key_path, material)
        remote = Remote(name=name, urls=checked_urls, key=key_path.resolve(), fingerprints=pins, repo_id=repo_id,
                        origin=path)
    existing[name] = remote
    write_atomic(path, dumps(existing, directory).encode())
    return remote, path


def remove(name: str, system: bool) -> Path:
    """Drop a remote from one config file (its copied key or root document too). Raises UsageError when it is
    not there."""
    directory = system_dir() if system else user_dir()
    path = directory / FILE_NAME
    existing = load_file(path)
    if name not in existing:
        raise UsageError("remote", f"no remote named {name!r} in {path}")
    removed = existing.pop(name)
    write_atomic(path, dumps(existing, directory).encode())
    if removed.key is not None and removed.key == (directory / "keys" / f"{name}.asc").resolve():
        removed.key.unlink(missing_ok=True)
    if removed.root is not None and removed.root == (directory / "keys" / f"{name}.root.json").resolve():
        removed.root.unlink(missing_ok=True)
    return path
