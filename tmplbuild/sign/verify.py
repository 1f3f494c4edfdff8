"""THE verifier: the one check clients and publishers both trust. Bytes in, verified result out.

Keys come only from the caller (key files plus pinned primary fingerprints) and are imported into a private,
throwaway GNUPGHOME; nothing is fetched, and `~/.gnupg` / `$GNUPGHOME` are never read. Decisions are taken
from gpg's status lines, not from its exit code or python-gnupg's `valid`: a key that expired or was revoked
still yields GOODSIG and exit 0.

Pinned keys must be strong (keys.STRENGTH_RULE: RSA >= 2048 bits, ECC on ed25519/NIST/Brainpool curves of 256
bits or more, no DSA or ElGamal): a weak pinned primary key, or a weak signing subkey that is still usable, is
a configuration error refused when the Verifier is made (UsageError, exit 2: `remote add` and every later run).
A signature by a weak key is refused at verify time as well (AuthenticityError, exit 3).

gpg runs are few, as a client verifies on every fetch: python-gnupg's version probe, one `--list-packets`, one
`--import` per key file, one listing at construction, then one `--verify` per signature; the listing
(validity, capabilities, expiry, strength) is judged again at verify time from that one listing plus the
clock. No gpg-agent is ever started (--no-autostart), so none needs stopping.
"""
from __future__ import annotations

import os
import shutil
import stat
import tempfile
import time
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import NoReturn

from tmplbuild.errors import LocalIOError, SignatureError, UsageError
from tmplbuild.sign.keys import (STRENGTH_RULE, KeyRecord, describe_key, list_key_records, normalise_fingerprint,
                                 open_gpg, packet_kinds, split_key_material, status_lines, strength_problem)

# Pinning is the trust decision, so gpg's web-of-trust must not add one: "--trust-model always" keeps "key not
# certified" warnings out of it. No key is ever fetched to check a signature by an unknown key.
# --no-autostart: verification needs public keys only, so no gpg-agent is started (none can be left behind
# by a verifier that never got to close(), and close() need not run gpgconf to stop one).
_GPG_OPTIONS = ["--trust-model", "always", "--no-auto-key-retrieve", "--no-autostart"]
_UNUSABLE = {"r": "revoked", "e": "expired"}
_PUBLIC_PACKETS = {"public key", "public sub key", "user ID", "attribute", "signature", "trust"}
_DIGESTS = {"8": "SHA256", "9": "SHA384", "10": "SHA512", "11": "SHA224"}
_WEAK_DIGESTS = {"1": "MD5", "2": "SHA1", "3": "RIPEMD160"}  # collisions can be bought: refused
_DOCUMENT_CLASSES = {"00", "01"}  # binary and text document signatures; not key certifications


@dataclass(frozen=True)
class Verified:
    fingerprint: str  # primary key fpr
    signer: str  # fpr of the (sub)key that signed
    created: int  # signature timestamp


class Verifier:
    """Checks detached signatures against pinned primary keys. Use as a context manager or call `close()`."""

    def __init__(self, public_keys: bytes, pinned: Iterable[str]) -> None:
        """`public_keys`: one or more public key files (armored or binary), concatenated. `pinned`: accepted
        primary fingerprints. Raises UsageError for a malformed or missing pinned fingerprint, for key material
        holding a secret key or anything but public keys, if gpg cannot read it, or for a pinned key below the
        strength rule (its primary key, or a signing subkey that is neither revoked nor expired)."""
        self.pinned = tuple(dict.fromkeys(normalise_fingerprint(p, "pinned fingerprint") for p in pinned))
        if not self.pinned:
            raise UsageError("pinned fingerprint", "none given: a verifier must pin at least one key")
        self._home = Path(tempfile.mkdtemp(prefix="tmplbuild-verify-"))  # mode 0700
        self._cleanup = weakref.finalize(self, shutil.rmtree, self._home, ignore_errors=True)
        try:
            self._keys: dict[str, KeyRecord] = {}  # every (sub)key of the pinned keyblocks, by fingerprint
            self._import(public_keys)
        except BaseException:
            self.close()
            raise

    def _import(self, material: bytes) -> None:
        # Parsed before importing, so a secret key never reaches disk or a gpg-agent, even a throwaway one.
        kinds = packet_kinds(material, self._home)
        if any(kind.startswith("secret") for kind in kinds):
            raise UsageError("keys", "the key material contains a secret key: give public keys only")
        if kinds - _PUBLIC_PACKETS:
            raise UsageError("keys", f"the key material holds {', '.join(sorted(kinds - _PUBLIC_PACKETS))} "
                                     "packets: give public key files only")
        self._gpg = open_gpg(self._home, _GPG_OPTIONS)
        for part in split_key_material(material):  # one import each: armor and binary may follow each other
            if int(self._gpg.import_keys(part).sec_read or 0):
                raise UsageError("keys", "the key material contains a secret key: give public keys only")
        records = list_key_records(self._gpg)
        found = sorted(r.fingerprint for r in records if r.is_primary)
        for fpr in self.pinned:
            if fpr not in found:
                raise UsageError("keys", f"pinned fingerprint {fpr} is not among the supplied public keys "
                                         f"(found: {', '.join(found) or 'none'})")
        now = time.time()
        for record in records:
            if record.primary not in self.pinned:
                continue
            self._keys[record.fingerprint] = record
            usable_signer = "s" in record.caps and _unusable(record, now) is None
            problem = strength_problem(record)
            if problem and (record.is_primary or usable_signer):
                what = "pinned key" if record.is_primary else f"signing subkey {record.fingerprint} of pinned key"
                raise UsageError("key strength", f"{what} {record.primary} is {describe_key(record)}: {problem} "
                                                 f"(keys must be {STRENGTH_RULE})")

    def verify(self, data: bytes, signature: bytes) -> Verified:
        """Check `signature` (detached, armored or binary) over `data`. Raises SignatureError (exit 3) naming
        what was found against what was expected."""
        # The data goes to gpg as a file in our private home, not through a pipe: on a signature it cannot use
        # (empty, a key block, garbage) gpg exits without reading its input, and python-gnupg's thread feeding
        # a pipe then met a broken pipe that surfaced, depending on timing, as BrokenPipeError (exit 1).
        fd, data_path = tempfile.mkstemp(dir=self._home, suffix=".data")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            return self._verify_path(data_path, signature)
        finally:
            os.unlink(data_path)

    def verify_file(self, path: Path, signature: bytes) -> Verified:
        """Like `verify`, over a file's content, which gpg reads itself (templates are too big for memory).
        Raises LocalIOError if `path` is not a readable regular file, SignatureError as `verify`."""
        try:
            if not stat.S_ISREG(os.stat(path).st_mode):
                raise LocalIOError("verify", f"{path} is not a regular file")
        except OSError as exc:
            raise LocalIOError("verify", f"cannot read {path}: {exc.strerror}") from None
        return self._verify_path(os.path.abspath(path), signature)  # absolute: never read as an option

    def verify_message(self, signed: bytes, cap: int = 1 << 20) -> tuple[Verified, bytes]:
        """Check an OpenPGP signed message (what `gpg --sign` makes: containers' simple signatures) and return
        the signature and the signed data, at most `cap` bytes of it. The same rules as `verify`: exactly one
        good signature by a pinned, usable, strong key, a SHA-2 digest, a document signature. Raises
        SignatureError (exit 3)."""
        fd, msg_path = tempfile.mkstemp(dir=self._home, suffix=".msg")
        out_path = msg_path + ".out"
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(signed)
            # --decrypt of a message that is only signed writes its data and reports the signature like --verify.
            result = self._gpg.decrypt_file(msg_path, output=out_path)
            verified = self._judge(result.stderr, message=True)
            try:
                with open(out_path, "rb") as f:
                    data = f.read(cap + 1)
            except OSError:
                _refuse("the signed message holds no data")
            if len(data) > cap:
                _refuse(f"the signed message holds more than {cap} bytes")
            return verified, data
        finally:
            os.unlink(msg_path)
            if os.path.exists(out_path):
                os.unlink(out_path)

    def _verify_path(self, data_path: str, signature: bytes) -> Verified:
        # gpg takes the detached signature as a file: it goes into our private home, nowhere else.
        fd, sig_path = tempfile.mkstemp(dir=self._home, suffix=".sig")
        try:
            with os.fdopen(fd, "wb") as sig:
                sig.write(signature)
            return self._judge(self._gpg.verify_file(sig_path, data_filename=data_path).stderr)
        finally:
            os.unlink(sig_path)

    def _judge(self, stderr: str, message: bool = False) -> Verified:
        """`message`: a signed message, which carries its data (PLAINTEXT), rather than a detached signature."""
        status = status_lines(stderr)
        seen = {s[0]: s for s in status}
        count = sum(1 for s in status if s[0] == "NEWSIG")
        if count == 0:
            _refuse("no signature found")
        if count > 1:
            _refuse(f"{count} signatures, expected exactly 1")
        if "PLAINTEXT" in seen and not message:
            _refuse("not a detached signature: it carries signed data of its own")
        if message and ("PLAINTEXT" not in seen or "DECRYPTION_OKAY" in seen or "BEGIN_DECRYPTION" in seen):
            _refuse("not a signed message (no signed data, or encrypted data)")
        if "BADSIG" in seen:
            _refuse("bad signature (data changed since it was signed)")
        if "ERRSIG" in seen:
            err = seen["ERRSIG"]  # ERRSIG <keyid> <pkalgo> <hashalgo> <class> <time> <rc> [<fpr>]
            who = err[7] if len(err) > 7 and err[7] != "-" else err[1]
            if "NO_PUBKEY" in seen:
                _refuse(f"signed by unknown key {who}, which is not pinned (pinned: {self._pins()})")
            _refuse(f"cannot check the signature by {who} (gpg error code {err[6] if len(err) > 6 else '?'})")
        valid = seen.get("VALIDSIG", [])
        # VALIDSIG <fpr> <date> <ts> <expire> <version> <reserved> <pkalgo> <hashalgo> <class> <primary-fpr>
        if len(valid) < 11:
            _refuse(f"no valid signature (gpg reported: {' '.join(sorted(seen)) or 'nothing'})")
        signer, primary, digest, sig_class = valid[1].upper(), valid[10].upper(), valid[8], valid[9]
        if primary not in self.pinned:
            _refuse(f"signed by {primary}, which is not pinned (pinned: {self._pins()})")
        if "REVKEYSIG" in seen:
            _refuse(f"key {signer} is revoked")
        if "EXPKEYSIG" in seen:
            _refuse(f"key {signer} is expired")
        if "EXPSIG" in seen:
            _refuse(f"the signature by {signer} is expired")
        if "GOODSIG" not in seen or not signer.endswith(seen["GOODSIG"][1].upper()):
            _refuse(f"no good signature by {signer}")
        if digest not in _DIGESTS:
            name = _WEAK_DIGESTS.get(digest, f"number {digest}")
            _refuse(f"signature by {signer} uses digest {name}, expected one of {', '.join(_DIGESTS.values())}")
        if sig_class not in _DOCUMENT_CLASSES:
            _refuse(f"signature by {signer} has class {sig_class}, not a document signature")
        if not valid[3].isdigit():
            _refuse(f"unreadable signature time {valid[3]!r}")
        self._check_keyring(primary, signer)
        return Verified(fingerprint=primary, signer=signer, created=int(valid[3]))

    def _check_keyring(self, primary: str, signer: str) -> None:
        # The status lines judge the key when gpg looked at it; the keyring also catches a key revoked or
        # expired after signing, whatever gpg thought of the signature itself. The listing is the one made at
        # construction: nothing is imported since, so only the clock can change it (expiry is checked here).
        now = time.time()
        for fpr in dict.fromkeys([primary, signer]):
            record = self._keys.get(fpr)
            if record is None or record.primary != primary:
                _refuse(f"key {fpr} is not part of pinned key {primary}")
            unusable = _unusable(record, now)
            if unusable:
                _refuse(f"key {fpr} is {unusable}")
            problem = strength_problem(record)
            if problem:
                _refuse(f"key {fpr} is {describe_key(record)}: {problem}")
        if "s" not in self._keys[signer].caps:
            _refuse(f"key {signer} is not a signing key")

    def _pins(self) -> str:
        return ", ".join(self.pinned)

    def close(self) -> None:
        """Remove the private home (no agent runs there: --no-autostart). Raises nothing; safe to call twice."""
        self._cleanup()

    def __enter__(self) -> Verifier:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def _refuse(message: str) -> NoReturn:
    raise SignatureError("signature", message)


def _unusable(record: KeyRecord, now: float) -> str | None:
    if record.validity in _UNUSABLE:
        return _UNUSABLE[record.validity]
    if record.expires and record.expires <= now:
        return "expired"
    return None
