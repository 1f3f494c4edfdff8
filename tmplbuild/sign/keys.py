"""Key homes and keys: where the signing key lives, making one, exporting its public half, and the small gpg
helpers the signer and verifier share.

Every gpg call names its GNUPGHOME explicitly (--homedir): `$GNUPGHOME` and `~/.gnupg` are never used, and no
keyserver is ever contacted.
"""
from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import gnupg

from tmplbuild.errors import LocalIOError, TmplbuildError, UsageError
from tmplbuild.run import CLEAN_ENV, run

_FPR_RE = re.compile(r"[0-9A-F]{40}")
_EXPIRE_RE = re.compile(r"never|none|0|[1-9][0-9]{0,5}[dwmy]?|[0-9]{4}-[0-9]{2}-[0-9]{2}")
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
    algo: str = ""  # field 4: OpenPGP public key algorithm number (1 RSA, 17 DSA, 22 EdDSA, ...)
    length: int = 0  # field 3: key length in bits (RSA modulus, DSA p, curve size for ECC)
    curve: str = ""  # field 17: curve name for ECC keys (ed25519, nistp256, brainpoolP256r1, ...)
    expires: int = 0  # field 7: expiry as seconds since the epoch; 0 = never


# The strength rule (docs/publishing.md, "Key strength"): RSA at least 2048 bits; DSA and ElGamal refused whatever their
# size; ECC on ed25519/ed448, NIST P-256/384/521 or Brainpool P-256/384/512. Checked for a pinned primary key
# and for the subkey that signs; unknown algorithms and curves are refused.
MIN_RSA_BITS = 2048
_RSA_ALGOS = {"1", "2", "3"}  # RSA, RSA encrypt-only, RSA sign-only
_REFUSED_ALGOS = {"16": "ElGamal", "20": "ElGamal", "17": "DSA"}
_ECC_ALGOS = {"18": "ECDH", "19": "ECDSA", "22": "EdDSA"}
STRONG_CURVES = ("ed25519", "ed448", "cv25519", "cv448", "nistp256", "nistp384", "nistp521", "brainpoolP256r1",
                 "brainpoolP384r1", "brainpoolP512r1")
_STRONG_CURVES = {c.lower() for c in STRONG_CURVES}
GENERATE_ALGOS = ("ed25519", "nistp256", "nistp384", "nistp521", "brainpoolP256r1", "brainpoolP384r1",
                  "brainpoolP512r1", "rsa2048", "rsa3072", "rsa4096")  # `tmplbuild key generate --algo`
_GENERATE_ALGOS = {a.lower(): a for a in GENERATE_ALGOS}
STRENGTH_RULE = (f"RSA of at least {MIN_RSA_BITS} bits, or ECC on ed25519, ed448, nistp256/384/521 or "
                 "brainpoolP256r1/384r1/512r1; DSA and ElGamal are refused")


def default_gnupghome() -> Path:
    """`$TMPLBUILD_GNUPGHOME` if set, else `~/.local/share/tmplbuild/gnupg`. Raises nothing."""
    env = os.environ.get("TMPLBUILD_GNUPGHOME")
    return Path(env) if env else Path.home() / ".local" / "share" / "tmplbuild" / "gnupg"


def check_gnupghome_location(home: Path, forbidden: list[Path]) -> None:
    """Refuse a key home where a private key could be committed or served: inside a git work tree (any project
    checkout, wherever the command runs from), or inside one of `forbidden` (what the command writes or reads that
    gets published: the repository, the recipe directory). Decided by what those places are, never by the current
    directory: `cd ~ && tmplbuild key generate` keeps its key in the default home under ~. Raises
    UsageError("gnupghome", ...)."""
    resolved = home.expanduser().resolve()
    for place in forbidden:
        place_resolved = place.expanduser().resolve()
        if resolved.is_relative_to(place_resolved):
            raise UsageError("gnupghome", f"{home} is inside {place}: keep the private key out of the project "
                                          "and out of anything served")
    tree = work_tree(resolved)
    if tree is not None:
        raise UsageError("gnupghome", f"{home} is inside the git work tree {tree}: keep the private key out of any "
                                      "checkout (--gnupghome DIR or TMPLBUILD_GNUPGHOME elsewhere)")


def work_tree(path: Path) -> Path | None:
    """The git work tree `path` (resolved; it need not exist yet) is in: the nearest ancestor holding `.git` (a
    directory, or the file of a linked worktree or submodule). None outside any."""
    for place in (path, *path.parents):
        if os.path.lexists(place / ".git"):
            return place
    return None


def normalise_fingerprint(value: str, what: str = "fingerprint") -> str:
    """Strip spaces and a leading 0x (as gpg and keyservers print them), upper-case. Raises UsageError(what, ...)
    unless the result is 40 hex digits."""
    fpr = "".join(value.split()).upper()
    if fpr.startswith("0X"):
        fpr = fpr[2:]
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


def agent_running(home: Path) -> bool:
    """Whether a gpg-agent already serves `home` (the user's own, with their cached passphrases): one that was
    there before tmplbuild ran is left running. Raises nothing."""
    import socket

    try:
        out = subprocess.run(["gpgconf", "--homedir", str(home), "--list-dirs", "agent-socket"], capture_output=True,
                             timeout=10, env={**CLEAN_ENV, "LC_ALL": "C"}, text=True).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return False
    if not out:
        return False
    # gpgconf percent-escapes special characters in paths (%3a for ':').
    path = re.sub(r"%([0-9a-fA-F]{2})", lambda m: chr(int(m.group(1), 16)), out)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(2)
        try:
            sock.connect(path)
        except OSError:
            return False  # no socket, or nobody listening on it
    return True


AGENT_LOCK = ".tmplbuild-agent.lock"  # in the GNUPGHOME: held shared by every tmplbuild run using it
AGENT_MARK = ".tmplbuild-agent"  # in the GNUPGHOME: the running gpg-agent was started by a tmplbuild run


class AgentGuard:
    """Stops, at the end of a run, the gpg-agent tmplbuild's gpg calls started in `home`, but never one the user
    was running there (their cached passphrases), and never while another tmplbuild run is still using the home
    (eight concurrent `publish` runs share one agent): each run holds a shared lock on AGENT_LOCK, and only the
    run that can then take it exclusively stops the agent. AGENT_MARK remembers that the agent is tmplbuild's,
    for the last run out, which may not be the one that started it."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self._fd: int | None = None
        self._ours = False
        try:
            fd = os.open(home / AGENT_LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError:
            fd = None  # a read-only home: no concurrent run can share it either
        if fd is not None:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_SH)
            self._fd = fd
        if not agent_running(home):
            self._ours = True
            try:
                (home / AGENT_MARK).touch()
            except OSError:
                pass

    def close(self) -> None:
        """Raises nothing."""
        if self._fd is None:
            if self._ours:
                kill_agents(self.home)
            return
        import fcntl

        fd, self._fd = self._fd, None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)  # another run still uses the home: the last one out stops the agent
            return
        try:
            mark = self.home / AGENT_MARK
            if self._ours or mark.exists():
                kill_agents(self.home)
                mark.unlink(missing_ok=True)
        finally:
            os.close(fd)


@contextmanager
def agents_stopped(home: Path) -> Iterator[None]:
    """Around gpg runs on `home`: a gpg-agent they start is stopped at the end; one running before is kept."""
    guard = AgentGuard(home) if home.is_dir() else None
    try:
        yield
    finally:
        if guard is not None:
            guard.close()
        elif home.is_dir():
            kill_agents(home)


def kill_agents(home: Path) -> None:
    """Stop the gpg-agent (and dirmngr) gpg started for `home`. Raises nothing: it is cleanup."""
    try:
        run(["gpgconf", "--homedir", str(home), "--kill", "all"], check="gnupghome", capture=True,
            error=LocalIOError)
    except TmplbuildError:
        pass


def describe_key(record: KeyRecord) -> str:
    """'RSA 1024 bits', 'EdDSA ed25519 255 bits', 'DSA 3072 bits', 'algorithm 99 255 bits'. Raises nothing."""
    if record.algo in _RSA_ALGOS:
        return f"RSA {record.length} bits"
    if record.algo in _ECC_ALGOS:
        return f"{_ECC_ALGOS[record.algo]} {record.curve or 'on an unnamed curve'} {record.length} bits"
    name = _REFUSED_ALGOS.get(record.algo) or f"algorithm {record.algo or '?'}"
    return f"{name} {record.length} bits"


def strength_problem(record: KeyRecord) -> str | None:
    """Why the key `record` is too weak to be trusted or used (see STRENGTH_RULE), or None. Raises nothing."""
    if record.algo in _RSA_ALGOS:
        return None if record.length >= MIN_RSA_BITS else f"RSA keys need at least {MIN_RSA_BITS} bits"
    if record.algo in _ECC_ALGOS:
        return None if record.curve.lower() in _STRONG_CURVES else \
            f"ECC keys must use one of {', '.join(STRONG_CURVES)}"
    if record.algo in _REFUSED_ALGOS:
        return f"{_REFUSED_ALGOS[record.algo]} keys are refused whatever their size"
    return "unknown public key algorithm"


def status_lines(stderr: str) -> list[list[str]]:
    """The `[GNUPG:]` status lines, split into fields (python-gnupg runs gpg with --status-fd 2: its result's
    stderr); other lines are skipped."""
    return [ln[9:].split() for ln in stderr.splitlines() if ln.startswith("[GNUPG:] ") and ln[9:].strip()]


def list_key_records(gpg: gnupg.GPG, *, secret: bool = False, fingerprint: str | None = None) -> list[KeyRecord]:
    """Primary keys and subkeys of the handle's keyring (or of one keyblock). Raises nothing; none found → []."""
    listing = gpg.list_keys(secret=secret, keys=[fingerprint] if fingerprint else None)
    return parse_key_listing(listing.data.decode("utf-8", "replace"))


def parse_key_listing(listing: str) -> list[KeyRecord]:
    """The keys of a `--with-colons --fixed-list-mode` listing (other lines, status lines included, are
    skipped). Raises nothing."""
    records: list[KeyRecord] = []
    pending: list[str] | None = None
    primary = ""
    for line in listing.splitlines():
        fields = line.split(":")
        if fields[0] in ("pub", "sec", "sub", "ssb"):
            pending = fields + [""] * 17
        elif fields[0] == "fpr" and pending is not None and len(fields) > 9:
            is_primary = pending[0] in ("pub", "sec")
            primary = fields[9] if is_primary else primary
            records.append(KeyRecord(primary, fields[9], is_primary, pending[1], pending[11], pending[14],
                                     algo=pending[3], length=_int(pending[2]), curve=pending[16],
                                     expires=_int(pending[6])))
            pending = None
    return records


def _int(field: str) -> int:
    return int(field) if field.isdigit() else 0


def list_secret_fingerprints(gnupghome: Path) -> list[str]:
    """Primary fingerprints of the secret keys in `gnupghome`. Raises UsageError if it is not a directory."""
    return [r.fingerprint for r in list_key_records(open_gpg(gnupghome), secret=True) if r.is_primary]


def generate_key(name: str, gnupghome: Path, expire: str = "2y", algo: str = "ed25519",
                 passphrase: str | None = None) -> str:
    """Create `gnupghome` (0700; an existing one is tightened to 0700) and in it a signing-only primary key,
    protected by `passphrase` (a root key, kept offline), or with none (None: CI's online key signs unattended;
    the directory's permissions protect it). A gpg-agent it starts is stopped. Returns its fingerprint.
    `algo` is one of GENERATE_ALGOS: never a key the verifier would refuse (STRENGTH_RULE).
    Raises UsageError for a bad name/expire/algo or a gpg failure, LocalIOError if the home cannot be made."""
    if not name.strip() or not name.isprintable() or len(name) >= 200:
        raise UsageError("key name", f"{name!r}: must be printable, one line, non-empty and under 200 characters")
    if not _EXPIRE_RE.fullmatch(expire):
        raise UsageError("key expiry", f"{expire!r}: use gpg's forms, e.g. 2y, 30d, 0 or never")
    if algo.lower() not in _GENERATE_ALGOS:
        raise UsageError("key algorithm", f"found {algo!r}, expected one of {', '.join(GENERATE_ALGOS)} "
                                          f"(keys must be {STRENGTH_RULE})")
    algo = _GENERATE_ALGOS[algo.lower()]
    try:
        gnupghome.mkdir(mode=0o700, parents=True, exist_ok=True)
        if gnupghome.stat().st_mode & 0o077:
            gnupghome.chmod(0o700)
    except OSError as exc:
        raise LocalIOError("gnupghome", f"cannot create {gnupghome}: {exc.strerror}") from None
    if passphrase is not None and (not passphrase or "\n" in passphrase):
        raise UsageError("passphrase", "a passphrase must be non-empty and one line")
    with agents_stopped(gnupghome):
        return _generate(name, gnupghome, expire, algo, passphrase)


def _generate(name: str, gnupghome: Path, expire: str, algo: str, passphrase: str | None) -> str:
    # python-gnupg has no --quick-gen-key; its parameter-file route cannot take gpg's algorithm names.
    secret = UNATTENDED if passphrase is None else ["--pinentry-mode", "loopback", "--passphrase-fd", "0"]
    done = run(["gpg", "--homedir", str(gnupghome), "--batch", "--yes", *secret, "--status-fd", "1",
                "--quick-gen-key", "--", name, algo, "sign", expire], check="generate key", capture=True,
               error=UsageError, input=None if passphrase is None else passphrase.encode() + b"\n")
    created = [s for s in status_lines(done.stdout.decode("utf-8", "replace")) if s[:1] == ["KEY_CREATED"]]
    if not created or len(created[-1]) < 3 or not _FPR_RE.fullmatch(created[-1][2]):
        raise UsageError("generate key", "gpg reported no new key")
    fpr = created[-1][2]
    # Belt and braces: whatever gpg made of the name, a key the verifier would refuse does not stay.
    made = [r for r in list_key_records(open_gpg(gnupghome), secret=True, fingerprint=fpr) if r.primary == fpr]
    problem = strength_problem(made[0]) if made else "gpg lists no such key"
    if problem:
        run(["gpg", "--homedir", str(gnupghome), "--batch", "--yes", *UNATTENDED, "--delete-secret-and-public-key",
             "--", fpr], check="generate key", capture=True, error=UsageError)
        raise UsageError("key strength", f"gpg made {fpr} as {describe_key(made[0]) if made else algo}: {problem}; "
                                         "the key was deleted")
    return fpr


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
        listed = run(["gpg", "--homedir", str(scratch_home), "--batch", "--no-autostart", "--list-only",
                      *UNATTENDED, "--list-packets"], check="keys", input=part, capture=True, error=UsageError)
        kinds.update(_PACKET_RE.findall(listed.stdout.decode("utf-8", "replace")))
    return kinds


def contains_secret_key(material: bytes, scratch_home: Path) -> bool:
    """Whether `material` holds any secret (sub)key packet. Raises UsageError if gpg cannot parse it."""
    return any(kind.startswith("secret") for kind in packet_kinds(material, scratch_home))
