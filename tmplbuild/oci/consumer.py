"""`tmplbuild oci trust`: the files with which stock skopeo and podman verify the images a repository signs,
against the online keys of the root this client trusts. Nothing of tmplbuild is needed at pull time.

    <out>/<name>.gpg                 the online keys, binary OpenPGP public keys (policy.json signedBy keyPath)
    <out>/registries.d/<name>.yaml   where the signatures are: the repository's sigstore/ (lookaside)
    <out>/policy.json                signedBy for the registry prefix; lenient (default) or strict

Install them as /etc/containers/registries.d/<name>.yaml and /etc/containers/policy.json (or merge the scope's
rule into an existing policy with `merge_policy`), or pass `--policy` and `--registries.d` to skopeo.

What a policy can and cannot say (containers/image v5.23.1, signature/policy_eval_signedby.go): one good
signature by any key of the keyring is enough. The root's threshold of online keys (k of j) is not expressible:
with k > 1, stock skopeo still accepts an image one online key signed. The signedIdentity rule is the default,
matchRepoDigestOrExact: a pull by tag needs a signature naming exactly that tag, a pull by digest one naming any
tag of the same repository.

Everything here is pure (bytes and dicts) except `write`."""
from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tmplbuild.errors import UsageError
from tmplbuild.files import atomic_write
from tmplbuild.oci.simplesign import parse_repository
from tmplbuild.sign.keys import normalise_fingerprint, split_key_material

_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
_ARMOR = re.compile(rb"\A-----BEGIN PGP PUBLIC KEY BLOCK-----\r?\n(.*?)^-----END PGP PUBLIC KEY BLOCK-----",
                    re.S | re.M)
_URL_CHARS = re.compile(r"[A-Za-z0-9._~:/?#\[\]@!$&()*+,;=%-]+")
# OpenPGP packet tags (RFC 4880 4.3)
_SIGNATURE, _SECRET_KEY, _PUBLIC_KEY, _SECRET_SUBKEY, _TRUST = 2, 5, 6, 7, 12
_USER_ID, _PUBLIC_SUBKEY, _USER_ATTRIBUTE = 13, 14, 17
_KEY_PACKETS = {_SIGNATURE, _PUBLIC_KEY, _TRUST, _USER_ID, _PUBLIC_SUBKEY, _USER_ATTRIBUTE}


@dataclass(frozen=True)
class Setup:
    """What `tmplbuild oci trust` was asked for.

    name          file name stem ([a-z0-9][a-z0-9._-]*)
    registry      the scope: registry host[:port] or host[:port]/path prefix the images are published under
    lookaside     the signatures' base URL: <repository URL>/sigstore (http, https or file:///)
    keys          key material holding the online keys (armored and/or binary; other keys in it are left out)
    fingerprints  the online keys' primary fingerprints: exactly these go into the keyring
    strict        policy.json rejects everything no rule accepts (see `policy`)
    keyring_path  where the keyring will be when skopeo reads the policy (absolute); default: the written one
    """

    name: str
    registry: str
    lookaside: str
    keys: bytes
    fingerprints: tuple[str, ...]
    strict: bool = False
    keyring_path: str | None = None


# -- the keyring ----------------------------------------------------------------------------------------------------

def dearmor(block: bytes) -> bytes:
    """The binary packets of one armored public key block (RFC 4880 6.2: headers, base64, optional CRC24,
    which is checked when present). Raises UsageError("oci keys", ...)."""
    if block.lstrip().startswith(b"-----BEGIN PGP PRIVATE KEY BLOCK-----"):
        raise UsageError("oci keys", "the key material holds a secret key: refusing it")
    m = _ARMOR.match(block.strip())
    if not m:
        raise UsageError("oci keys", "not an armored public key block")
    lines = m.group(1).decode("ascii", "replace").splitlines()
    while lines and lines[0].strip() and ":" in lines[0]:  # armor headers (Comment:, Version:)
        lines.pop(0)
    body = [ln.strip() for ln in lines if ln.strip()]
    crc = body.pop()[1:] if body and body[-1].startswith("=") and len(body[-1]) == 5 else None
    try:
        data = base64.b64decode("".join(body), validate=True)
        if crc is not None and int.from_bytes(base64.b64decode(crc, validate=True), "big") != _crc24(data):
            raise UsageError("oci keys", "armored key block: CRC24 mismatch (damaged)")
    except (binascii.Error, ValueError):
        raise UsageError("oci keys", "armored key block: bad base64") from None
    return data


def _crc24(data: bytes) -> int:
    crc = 0xB704CE
    for byte in data:
        crc ^= byte << 16
        for _ in range(8):
            crc <<= 1
            if crc & 0x1000000:
                crc ^= 0x1864CFB
    return crc & 0xFFFFFF


def packets(data: bytes) -> list[tuple[int, bytes, bytes]]:
    """(tag, body, whole packet) of each OpenPGP packet in `data`. Raises UsageError("oci keys", ...) for a
    malformed stream, an indeterminate or partial length (never used for key material)."""
    out = []
    pos = 0
    while pos < len(data):
        start, ctb = pos, data[pos]
        pos += 1
        if not ctb & 0x80:
            raise UsageError("oci keys", f"not OpenPGP data (byte {start})")
        if ctb & 0x40:  # new format
            tag = ctb & 0x3F
            if pos >= len(data):
                raise UsageError("oci keys", "truncated packet")
            first = data[pos]
            pos += 1
            if first < 192:
                length = first
            elif first < 224:
                if pos >= len(data):
                    raise UsageError("oci keys", "truncated packet")
                length = ((first - 192) << 8) + data[pos] + 192
                pos += 1
            elif first == 255:
                length = int.from_bytes(data[pos:pos + 4], "big")
                pos += 4
            else:
                raise UsageError("oci keys", "partial body length in key material")
        else:
            tag, kind = (ctb >> 2) & 0x0F, ctb & 0x03
            if kind == 3:
                raise UsageError("oci keys", "indeterminate packet length in key material")
            size = (1, 2, 4)[kind]
            length = int.from_bytes(data[pos:pos + size], "big")
            pos += size
        if pos + length > len(data):
            raise UsageError("oci keys", "truncated packet")
        out.append((tag, data[pos:pos + length], data[start:pos + length]))
        pos += length
    return out


def _fingerprint(body: bytes) -> str:
    """The v4 fingerprint of a public key packet body (RFC 4880 12.2)."""
    if not body or body[0] != 4:
        raise UsageError("oci keys", f"a version {body[0] if body else '?'} key: only v4 keys (40-hex-digit "
                                     "fingerprints) are supported")
    return hashlib.sha1(b"\x99" + len(body).to_bytes(2, "big") + body).hexdigest().upper()


def keyblocks(material: bytes) -> dict[str, bytes]:
    """Each public keyblock in `material` (armored blocks and binary runs, in any mix) by its primary
    fingerprint, as binary packets. Raises UsageError("oci keys", ...) for secret key material, anything that is
    not a public key, or malformed data."""
    blocks: dict[str, bytes] = {}
    for part in split_key_material(material):
        binary = dearmor(part) if part.startswith(b"-----BEGIN") else part
        fpr, current = None, b""
        for tag, body, whole in packets(binary):
            if tag in (_SECRET_KEY, _SECRET_SUBKEY):
                raise UsageError("oci keys", "the key material holds a secret key: refusing it")
            if tag not in _KEY_PACKETS:
                raise UsageError("oci keys", f"OpenPGP packet type {tag} is not part of a public key")
            if tag == _PUBLIC_KEY:
                if fpr is not None:
                    blocks.setdefault(fpr, current)
                fpr, current = _fingerprint(body), b""
            elif fpr is None:
                raise UsageError("oci keys", "key material does not start with a public key packet")
            current += whole
        if fpr is not None:
            blocks.setdefault(fpr, current)
    return blocks


def keyring(material: bytes, fingerprints: Iterable[str]) -> bytes:
    """The binary keyring of exactly the keys `fingerprints` (primary fingerprints, in that order), taken from
    `material`; any other key in it is left out, so the policy trusts nothing the root does not name.
    Raises UsageError("oci keys", ...) when one is missing, or none is given, or the material is refused."""
    wanted = list(dict.fromkeys(normalise_fingerprint(f) for f in fingerprints))
    if not wanted:
        raise UsageError("oci keys", "no online key to trust")
    blocks = keyblocks(material)
    missing = [f for f in wanted if f not in blocks]
    if missing:
        raise UsageError("oci keys", f"no public key {missing[0]} in the key material")
    return b"".join(blocks[f] for f in wanted)


# -- registries.d and policy.json -----------------------------------------------------------------------------------

def check_lookaside(url: str) -> str:
    """The lookaside base URL without a trailing '/' (containers/image appends "/<path>", and a '//' is a 404
    on tmplbuild's server). http, https (host required) or file:///absolute/path; no query, fragment, user
    info, spaces or quotes. Raises UsageError("oci lookaside", ...)."""
    if not isinstance(url, str) or not _URL_CHARS.fullmatch(url):
        raise UsageError("oci lookaside", f"{url!r}: not a URL (no spaces, quotes or non-ASCII)")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https", "file") or parts.query or parts.fragment or "@" in parts.netloc:
        raise UsageError("oci lookaside", f"{url!r}: expected http(s)://HOST/PATH or file:///PATH, without query, "
                                          "fragment or user name")
    if parts.scheme == "file" and (parts.netloc or not parts.path.strip("/")):
        raise UsageError("oci lookaside", f"{url!r}: a file URL is file:///absolute/path (not the root)")
    if parts.scheme != "file" and not parts.hostname:
        raise UsageError("oci lookaside", f"{url!r}: no host")
    return url.rstrip("/")


def registries_d(scope: str, lookaside: str) -> bytes:
    """The registries.d YAML that sends skopeo to `lookaside` for images under `scope`. Both keys are written:
    `lookaside` is what containers/image reads since v5.22 (Debian 12's skopeo 1.9.3 has v5.23.1), `sigstore`
    what older ones read (and newer ones still do, as the deprecated name; `lookaside` wins when both are set).
    Values are JSON strings, which YAML reads as double-quoted scalars. Raises UsageError for a bad scope or URL.

    Note: containers/image refuses the whole registries.d when two files name the same scope."""
    scope, url = parse_repository(scope), check_lookaside(lookaside)
    return (f"# tmplbuild oci trust: signatures of the images under {scope}\n"
            f"docker:\n  {json.dumps(scope)}:\n    lookaside: {json.dumps(url)}\n"
            f"    sigstore: {json.dumps(url)}\n").encode()


def requirement(keyring_path: str) -> list[dict[str, Any]]:
    """The policy requirement list for the scope: one signedBy rule with the keyring. Raises UsageError unless
    `keyring_path` is absolute (containers/image reads it as given, relative to whatever directory it runs in)."""
    if not isinstance(keyring_path, str) or not keyring_path.startswith("/") or "\n" in keyring_path:
        raise UsageError("oci keyring", f"{keyring_path!r}: the keyring's path must be absolute")
    return [{"type": "signedBy", "keyType": "GPGKeys", "keyPath": keyring_path}]


def policy(scope: str, keyring_path: str, *, strict: bool = False) -> dict[str, Any]:
    """A whole policy.json. Lenient (default): anything outside `scope` is accepted as stock policy.json does
    (insecureAcceptAnything), and images under `scope` need a signature by a keyring key. Strict: the default
    is reject, so only images under `scope`, signed, are accepted from any transport (other registries,
    docker-archive:, oci-archive: files alike); for hosts that run only these templates.
    Raises UsageError for a bad scope or keyring path."""
    scope = parse_repository(scope)
    default = [{"type": "reject"}] if strict else [{"type": "insecureAcceptAnything"}]
    return {"default": default, "transports": {"docker": {scope: requirement(keyring_path)}}}


def merge_policy(existing: Mapping[str, Any], scope: str, keyring_path: str) -> dict[str, Any]:
    """`existing` (a parsed policy.json, e.g. /etc/containers/policy.json) with the scope's rule set (replacing
    any rule for that exact scope; everything else kept). Raises UsageError when `existing` is not a policy."""
    scope = parse_repository(scope)
    if not isinstance(existing, Mapping) or not isinstance(existing.get("default"), list):
        raise UsageError("oci policy", "the existing policy has no \"default\" list: not a policy.json")
    transports = existing.get("transports", {})
    docker = transports.get("docker", {}) if isinstance(transports, Mapping) else None
    if not isinstance(transports, Mapping) or not isinstance(docker, Mapping):
        raise UsageError("oci policy", "the existing policy's \"transports\" is not an object of objects")
    merged = json.loads(json.dumps(existing))  # a deep copy of plain JSON
    merged.setdefault("transports", {}).setdefault("docker", {})[scope] = requirement(keyring_path)
    return merged


def render(setup: Setup, keyring_path: str) -> dict[str, bytes]:
    """The files of `setup`, by path relative to the output directory, in the order they should be written
    (the keyring before the policy that names it). Raises UsageError for anything `Setup` holds that is bad."""
    if not isinstance(setup.name, str) or not _NAME.fullmatch(setup.name):
        raise UsageError("oci trust", f"name {setup.name!r}: expected [a-z0-9][a-z0-9._-]* (at most 64)")
    ring = keyring(setup.keys, setup.fingerprints)
    doc = policy(setup.registry, setup.keyring_path or keyring_path, strict=setup.strict)
    return {f"{setup.name}.gpg": ring,
            f"registries.d/{setup.name}.yaml": registries_d(setup.registry, setup.lookaside),
            "policy.json": (json.dumps(doc, indent=2) + "\n").encode()}


def write(out_dir: Path, setup: Setup) -> list[Path]:
    """Write the files of `setup` into `out_dir` (made if missing), each atomically (temporary name, fsync,
    rename), and return their paths. The policy names `setup.keyring_path`, else the keyring written here by
    its absolute path. Raises UsageError (see `render`; nothing is written then), LocalIOError."""
    out = out_dir.absolute()
    files = render(setup, str(out / f"{setup.name}.gpg"))
    written = []
    for rel, data in files.items():
        path = out / rel
        atomic_write(path, data, mode=0o644, durable=True, check="oci trust")
        written.append(path)
    return written
