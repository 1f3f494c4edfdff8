"""Detached signatures with one pinned secret key from a dedicated GNUPGHOME."""
from __future__ import annotations

from pathlib import Path
from types import TracebackType

import gnupg

from tmplbuild.errors import LocalIOError, UsageError
from tmplbuild.sign.keys import (STRENGTH_RULE, UNATTENDED, AgentGuard, KeyRecord, describe_key,
                                 list_key_records, normalise_fingerprint, open_gpg, status_lines, strength_problem)

# SHA256 (OpenPGP hash id 8, as SIG_CREATED reports it): what gpg picks for ed25519 anyway, and with the
# CPU's SHA extensions about twice as fast as SHA512 over a 60 MB template (bench/publish.py).
_DIGEST_ID, _DIGEST = "8", "SHA256"
_REFUSED_VALIDITY = {"e": "expired", "r": "revoked", "d": "disabled", "i": "invalid"}


class Signer:
    """Signs with the key `fingerprint` (its primary fingerprint) from `gnupghome`.

    gpg may start a gpg-agent in `gnupghome`; `close()` (or leaving a `with` block) stops it."""

    def __init__(self, gnupghome: Path, fingerprint: str, passphrase: str | None = None) -> None:
        """Raises UsageError if the fingerprint is malformed, `gnupghome` is not a directory, or it holds no
        usable secret key with that primary fingerprint (missing, expired, revoked, or unable to sign), or the
        key is weaker than verifiers accept (keys.STRENGTH_RULE: its primary, or every usable signing key)."""
        self.fingerprint = normalise_fingerprint(fingerprint)
        self.gnupghome = gnupghome
        self._agent = AgentGuard(gnupghome) if gnupghome.is_dir() else None
        # Without a passphrase: never a pinentry (a protected key fails at once instead of hanging CI). With one
        # (a root key): handed to gpg on its stdin, ahead of the data, never on a command line.
        self._passphrase = passphrase
        self._gpg: gnupg.GPG = open_gpg(gnupghome, UNATTENDED if passphrase is None
                                        else ["--pinentry-mode", "loopback"])
        self._signing_keys = self._usable_signing_keys()

    def _usable_signing_keys(self) -> frozenset[str]:
        fpr = self.fingerprint
        block = [r for r in list_key_records(self._gpg, secret=True, fingerprint=fpr) if r.primary == fpr]
        if not block:
            raise UsageError("key", f"no secret key {fpr} in {self.gnupghome}")
        primary = block[0]
        if primary.validity in _REFUSED_VALIDITY:
            raise UsageError("key", f"key {fpr} is {_REFUSED_VALIDITY[primary.validity]}")
        if "S" not in primary.caps:
            raise UsageError("key", f"key {fpr} has no usable signing (sub)key")
        # Verifiers refuse signatures by weak keys: signing with one would publish what no client accepts.
        problem = strength_problem(primary)
        if problem:
            raise UsageError("key strength", f"key {fpr} is {describe_key(primary)}: {problem} "
                                             f"(keys must be {STRENGTH_RULE})")
        weak = [r for r in block if "s" in r.caps and r.validity not in _REFUSED_VALIDITY and strength_problem(r)]
        if weak:
            raise UsageError("key strength", f"signing subkey {weak[0].fingerprint} of key {fpr} is "
                                             f"{describe_key(weak[0])}: {strength_problem(weak[0])} (keys must be "
                                             f"{STRENGTH_RULE}; revoke or remove it)")
        usable = frozenset(r.fingerprint for r in block if _can_sign(r))
        if not usable:
            raise UsageError("key", f"key {fpr}: no signing (sub)key has its secret part in {self.gnupghome}")
        return usable

    def sign(self, data: bytes, *, armored: bool) -> bytes:
        """A detached SHA-512 signature over `data`: armored (`.asc`) or binary (`.gpg`).
        Raises UsageError if gpg does not sign (e.g. the key has a passphrase or expired since __init__)."""
        return self._check(self._gpg.sign(data, **self._sign_args(armored)))

    def sign_message(self, data: bytes) -> bytes:
        """A binary OpenPGP signed message holding `data` (what `gpg --sign` makes: not detached, not
        clearsigned), SHA256, made by the primary key itself: containers' "simple signing" stores exactly this,
        and its verifiers (containers/image with gpgme: skopeo, podman) accept only signatures whose key is a
        primary key they imported ("Signature by key <subkey> is not accepted" otherwise).
        Raises UsageError if the primary key cannot sign (only a subkey can), or gpg does not sign."""
        if self.fingerprint not in self._signing_keys:
            raise UsageError("sign", f"key {self.fingerprint} signs only through a subkey; a signed message must "
                                     "be made by the primary key (containers/image accepts no subkey signature)")
        # "FPR!" makes gpg use exactly the primary key, never the newest signing subkey.
        return self._check(self._gpg.sign(data, **self._sign_args(False, detach=False, user=self.fingerprint + "!")),
                           kind="S", keys=frozenset({self.fingerprint}))

    def sign_file(self, path: Path, *, armored: bool) -> bytes:
        """Like `sign`, over a file's content, streamed to gpg (templates are too big to hold in memory).
        Raises LocalIOError if the file cannot be read, UsageError if gpg does not sign."""
        try:
            stream = open(path, "rb")
        except OSError as exc:
            raise LocalIOError("sign", f"cannot read {path}: {exc.strerror}") from None
        # Our own file object, closed only after gpg exited: python-gnupg closes a path it opened itself while
        # its copying thread may still be reading it.
        with stream:
            return self._check(self._gpg.sign_file(stream, **self._sign_args(armored)))

    def _sign_args(self, armored: bool, *, detach: bool = True, user: str | None = None) -> dict[str, object]:
        # --local-user rather than python-gnupg's --default-key: -u wins over any default-key in a gpg.conf.
        return {"keyid": None, "detach": detach, "clearsign": False, "binary": not armored,
                "passphrase": self._passphrase, "extra_args": ["--local-user", user or self.fingerprint, "--digest-algo", _DIGEST]}

    def _check(self, result: gnupg.Sign, *, kind: str = "D", keys: frozenset[str] | None = None) -> bytes:
        created = [s for s in status_lines(result.stderr) if s[0] == "SIG_CREATED"]
        # SIG_CREATED <type> <pk-algo> <hash-algo> <class> <timestamp> <key-fpr>; type D detached, S signed message
        if len(created) != 1 or len(created[0]) < 7 or not result.data:
            raise UsageError("sign", f"gpg made no signature with {self.fingerprint}: {_last_error(result.stderr)}")
        made, hash_algo, key = created[0][1], created[0][3], created[0][6].upper()
        if made != kind or hash_algo != _DIGEST_ID or key not in (self._signing_keys if keys is None else keys):
            raise UsageError("sign", f"gpg made an unexpected signature (type {made}, hash {hash_algo}, key {key})")
        return bytes(result.data)

    def close(self) -> None:
        """Stop the gpg-agent gpg started in the home (one that was running before is the user's: kept).
        Raises nothing."""
        if self._agent is not None:
            self._agent.close()
            self._agent = None

    def __enter__(self) -> Signer:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def _can_sign(record: KeyRecord) -> bool:
    return "s" in record.caps and record.validity not in _REFUSED_VALIDITY and record.token != "#"


def _last_error(stderr: str) -> str:
    lines = [ln.strip() for ln in stderr.splitlines() if ln.startswith("gpg: ")]
    return lines[-1][:300] if lines else "no message from gpg"
