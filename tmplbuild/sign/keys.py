"""Key homes and keys: where the signing key lives, making one, exporting its public half, and the small gpg
helpers the signer and verifier share.

Every gpg call names its GNUPGHOME explicitly (--homedir): `$GNUPGHOME` and `~/.gnupg` are never used, and no
keyserver is ever contacted.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import gnupg

from tmplbuild.errors import LocalIOError, TmplbuildError, UsageError
from tmplbuild.run import run

_FPR_RE = re.compile(r"[0-9A-F]{40}")
_EXPIRE_RE = re.compile(r"never|none|0|[1-9][0-9]{0,5}[dwmy]?|[0-9]{4}-[0-9]{2}-[0-9]{2}")
_ALGO_RE = re.compile(r"[a-z][a-z0-9]{1,31}")
_ARMOR_RE = re.compile(rb"-----BEGIN PGP [A-Z0-9 ,]+-----.*?-----END PGP [A-Z0-9 ,]+-----", re.S)
_PACKET_RE = re.compile(r"^:(.+?) packet:", re.M)

# CI signs unattended: never a pinentry, never a passphrase read from stdin (which carries the data). A key that
# does have a passphrase then fails at once instead of hanging the run.
UNATTENDED = ["--pinentry-mode", "loopback", "--passphrase", ""]


@dataclass(frozen=True)
class KeyRecord:
    """One primary key or subkey from a `--with-colons` listing."""

    primary: str  # fingerprint of the primary key of its keyblock
    fingerprint: str
    is_primary: bool
    validity: str  # field 2: 'e' expired, 'r' revoked, 'd' disabled, 'i' invalid
    caps: str  # field 12: own capabilities lower case, the whole key's usable ones upper case
    token: str  # field 15 of secret listings: '+' secret present, '#' stub only


def default_gnupghome() -> Path:
    """`$TMPLBUILD_GNUPGHOME` if set, else `~/.local/share/tmplbuild/gnupg`. Raises nothing."""
    env = os.environ.get("TMPLBUILD_GNUPGHOME")
    return Path(env) if env else Path.home() / ".local" / "share" / "tmplbuild" / "gnupg"


def check_gnupghome_location(home: Path, forbidden: list[Path]) -> None:
    """Refuse a key home inside the project or a served tree, where a private key could be committed or served.
    Raises UsageError("gnupghome", ...) if resolved `home` is (inside) any resolved `forbidden` directory."""
    resolved = home.expanduser().resolve()
    for place in forbidden:
        place_resolved = place.expanduser().resolve()
        if resolved.is_relative_to(place_resolved):
            raise UsageError("gnupghome", f"{home} is inside {place}: keep the private key out of the project "
                                          "and out of anything served")


def normalise_fingerprint(value: str, what: str = "fingerprint") -> str:
    """Strip spaces, upper-case. Raises UsageError(what, ...) unless the result is 40 hex digits."""
    fpr = "".join(value.split()).upper()
    if not _FPR_RE.fullmatch(fpr):
        raise UsageError(what, f"{value!r} is not a 40-hex-digit OpenPGP fingerprint")
    return fpr


def open_gpg(home: Path, options: list[str] | None = None) -> gnupg.GPG:
    """A python-gnupg handle bound to `home`. Raises UsageError if `home` is not a directory or gpg cannot run."""
    if not home.is_dir():
        raise UsageError("gnupghome", f"{home} is not a directory")
    # --homedir already wins over $GNUPGHOME; dropping it too means nothing gpg spawns can fall back to it.
    env = {k: v for k, v in os.environ.items() if k != "GNUPGHOME"}
    env["LC_ALL"] = "C"
    try:
        gpg = gnupg.GPG(gnupghome=str(home), env=env, options=options)
    except (OSError, ValueError) as exc:
        raise UsageError("gpg", f"cannot run gpg on {home}: {exc}") from None
    gpg.buffer_size = 1 << 20  # templates are 50-200 MB: 16 KiB pipe writes would be needlessly slow
    return gpg


def kill_agents(home: Path) -> None:
    """Stop the gpg-agent (and dirmngr) gpg started for `home`. Raises nothing: it is cleanup."""
    try:
        run(["gpgconf", "--homedir", str(home), "--kill", "all"], check="gnupghome", capture=True,
            error=LocalIOError)
    except TmplbuildError:
        pass


def status_lines(stderr: str) -> list[list[str]]:
    """The `[GNUPG:]` status lines (python-gnupg runs gpg with --status-fd 2), split into fields."""
    return [ln[9:].split() for ln in stderr.splitlines() if ln.startswith("[GNUPG:] ") and ln[9:].strip()]


def list_key_records(gpg: gnupg.GPG, *, secret: bool = False, fingerprint: str | None = None) -> list[KeyRecord]:
    """Primary keys and subkeys of the handle's keyring (or of one keyblock). Raises nothing; none found → []."""
    listing = gpg.list_keys(secret=secret, keys=[fingerprint] if fingerprint else None)
    records: list[KeyRecord] = []
    pending: list[str] | None = None
    primary = ""
    for line in listing.data.decode("utf-8", "replace").splitlines():
        fields = line.split(":")
        if fields[0] in ("pub", "sec", "sub", "ssb"):
            pending = fields + [""] * 16
        elif fields[0] == "fpr" and pending is not None and len(fields) > 9:
            is_primary = pending[0] in ("pub", "sec")
            primary = fields[9] if is_primary else primary
            records.append(KeyRecord(primary, fields[9], is_primary, pending[1], pending[11], pending[14]))
            pending = None
    return records


def list_secret_fingerprints(gnupghome: Path) -> list[str]:
    """Primary fingerprints of the secret keys in `gnupghome`. Raises UsageError if it is not a directory."""
    return [r.fingerprint for r in list_key_records(open_gpg(gnupghome), secret=True) if r.is_primary]


def generate_key(name: str, gnupghome: Path, expire: str = "2y", algo: str = "ed25519") -> str:
    """Create `gnupghome` (0700; an existing one is tightened to 0700) and in it a signing-only primary key with
    no passphrase (CI signs unattended; the directory's permissions protect the key). Returns its fingerprint.
    Raises UsageError for a bad name/expire/algo or a gpg failure, LocalIOError if the home cannot be made."""
    if not name.strip() or not name.isprintable() or len(name) >= 200:
        raise UsageError("key name", f"{name!r}: must be printable, one line, non-empty and under 200 characters")
    if not _EXPIRE_RE.fullmatch(expire):
        raise UsageError("key expiry", f"{expire!r}: use gpg's forms, e.g. 2y, 30d, 0 or never")
    if not _ALGO_RE.fullmatch(algo):
        raise UsageError("key algorithm", f"{algo!r} is not a gpg algorithm name such as ed25519 or rsa4096")
    try:
        gnupghome.mkdir(mode=0o700, parents=True, exist_ok=True)
        if gnupghome.stat().st_mode & 0o077:
            gnupghome.chmod(0o700)
    except OSError as exc:
        raise LocalIOError("gnupghome", f"cannot create {gnupghome}: {exc.strerror}") from None
    # python-gnupg has no --quick-gen-key; its parameter-file route cannot take gpg's algorithm names.
    done = run(["gpg", "--homedir", str(gnupghome), "--batch", "--yes", *UNATTENDED, "--status-fd", "1",
                "--quick-gen-key", "--", name, algo, "sign", expire], check="generate key", capture=True,
               error=UsageError)
    created = [s for s in status_lines(done.stdout.decode("utf-8", "replace")) if s[:1] == ["KEY_CREATED"]]
    if not created or len(created[-1]) < 3 or not _FPR_RE.fullmatch(created[-1][2]):
        raise UsageError("generate key", "gpg reported no new key")
    return created[-1][2]


def export_public(fingerprint: str, gnupghome: Path, armored: bool) -> bytes:
    """The public keyblock of `fingerprint` (never secret material), armored or binary (`gpgv --keyring` and
    systemd's import-pubring.gpg want binary). Raises UsageError if that key is not in `gnupghome`."""
    fpr = normalise_fingerprint(fingerprint)
    gpg = open_gpg(gnupghome)
    if not any(r.is_primary and r.fingerprint == fpr for r in list_key_records(gpg, fingerprint=fpr)):
        raise UsageError("key", f"no public key {fpr} in {gnupghome}")
    exported = gpg.export_keys(fpr, secret=False, armor=armored)
    data = exported.encode(gpg.encoding) if isinstance(exported, str) else exported
    if not data:
        raise UsageError("key", f"gpg exported nothing for {fpr} from {gnupghome}")
    return data


def split_key_material(material: bytes) -> list[bytes]:
    """Armored blocks and binary runs of concatenated key files, in order: gpg reads several of one kind in a row
    but stops where binary and armor meet. Raises nothing."""
    parts: list[bytes] = []
    pos = 0
    for block in _ARMOR_RE.finditer(material):
        parts.append(material[pos:block.start()].lstrip())  # packet tags have bit 7 set: never whitespace
        parts.append(block.group())
        pos = block.end()
    parts.append(material[pos:].lstrip())
    return [p for p in parts if p]


def packet_kinds(material: bytes, scratch_home: Path) -> set[str]:
    """OpenPGP packet kinds in `material` ("public key", "secret sub key", ...), read by `gpg --list-packets`
    without importing anything. Raises UsageError if gpg cannot parse a part."""
    kinds: set[str] = set()
    for part in split_key_material(material):
        # --list-only: an encrypted packet is listed, never decrypted (no passphrase prompt, no agent).
        listed = run(["gpg", "--homedir", str(scratch_home), "--batch", "--list-only", *UNATTENDED,
                      "--list-packets"], check="keys", input=part, capture=True, error=UsageError)
        kinds.update(_PACKET_RE.findall(listed.stdout.decode("utf-8", "replace")))
    return kinds


def contains_secret_key(material: bytes, scratch_home: Path) -> bool:
    """Whether `material` holds any secret (sub)key packet. Raises UsageError if gpg cannot parse it."""
    return any(kind.startswith("secret") for kind in packet_kinds(material, scratch_home))
