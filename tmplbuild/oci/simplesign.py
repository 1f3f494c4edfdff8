"""containers' "simple signing" ("atomic container signature"): the signatures stock skopeo and podman verify
with a policy.json `signedBy` rule, kept in a lookaside tree beside the registry.

A signature is an OpenPGP signed message (binary, not detached) whose literal data is this JSON payload:

    {"critical": {"identity": {"docker-reference": "registry.example.org/templates/debian-12-minimal:TAG"},
                  "image": {"docker-manifest-digest": "sha256:<hex>"},
                  "type": "atomic container signature"},
     "optional": {"creator": "tmplbuild 0.1.0", "timestamp": 1780000000}}

Rules taken from containers/image v5.23.1 (what Debian 12's skopeo 1.9.3 is built with):

- signature/simple.go: `critical` must hold exactly type, image and identity; `optional` is free-form, its
  `timestamp` an integer;
- signature/policy_reference_match.go (matchRepoDigestOrExact, signedBy's default identity rule): pulling by tag
  needs a signature naming exactly that repository:tag; pulling by digest accepts a signature naming any tag of
  the same repository. So each tag gets its own signature, and a signature never names a bare repository;
- signature/mechanism_gpgme.go, policy_eval_signedby.go: the signing key identity must be the fingerprint of a
  key in the keyring; gpgme reports the subkey's fingerprint for a subkey signature, which then matches no
  imported key. Signer.sign_message therefore signs with the primary key only;
- docker/registries_d.go (lookasideStorageBaseURL, lookasideStorageURL): the lookaside URL is
  `<base>/<reference.Path(ref)>@<algorithm>=<hex>/signature-<n>`, n from 1, read until the first missing one.
  reference.Path is the repository path without the registry host: the host and any port are dropped, so the
  same image on two registries shares its lookaside directory (and signatures name the registry they hold).
- docker/reference (regexp.go, normalize.go): the reference grammar below, and docker.io's normalisation
  (`index.docker.io` -> `docker.io`, a one-component path on docker.io -> `library/<name>`).
"""
from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from typing import Any

from tmplbuild import __version__
from tmplbuild import strictjson
from tmplbuild.errors import AuthenticityError, SignatureError, UsageError

SIGNATURE_TYPE = "atomic container signature"
# docker/reference/regexp.go, ASCII only (Go's \w is [0-9A-Za-z_]).
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = re.compile(rf"{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*(?::[0-9]+)?")
_PATH_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-*)[a-z0-9]+)*")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")  # go-digest's sha256: exactly 64 lowercase hex digits
NAME_MAX = 255  # reference.NameTotalLengthMax: registry + "/" + path
_DOCKER_HUB, _LEGACY_HUB = "docker.io", "index.docker.io"


@dataclass(frozen=True)
class Reference:
    """registry host[:port], repository path (without the host), and a tag or a digest (never both)."""

    registry: str
    path: str
    tag: str | None = None
    digest: str | None = None

    @property
    def name(self) -> str:
        """host[:port]/path: the repository, what policy.json and registries.d scopes name."""
        return f"{self.registry}/{self.path}"

    def __str__(self) -> str:
        if self.digest:
            return f"{self.name}@{self.digest}"
        return f"{self.name}:{self.tag}" if self.tag else self.name


def _parse(ref: str, what: str = "oci reference") -> Reference:
    """Any of host/path, host/path:tag, host/path@sha256:hex. Raises UsageError(what, ...)."""
    if not isinstance(ref, str) or not ref.isascii() or not ref.isprintable() or " " in ref:
        raise UsageError(what, f"{ref!r}: not a registry reference (printable ASCII, no spaces)")
    rest, digest = ref, None
    if "@" in rest:
        rest, digest = rest.split("@", 1)
        if not _DIGEST.fullmatch(digest):
            raise UsageError(what, f"{ref!r}: the digest must be sha256: and 64 lowercase hex digits")
    if "/" not in rest:
        raise UsageError(what, f"{ref!r}: expected REGISTRY[:PORT]/PATH:TAG, with the registry host written out")
    registry, remainder = rest.split("/", 1)
    tag = None
    if ":" in remainder:
        remainder, tag = remainder.rsplit(":", 1)
        if not _TAG.fullmatch(tag):
            raise UsageError(what, f"{ref!r}: tag {tag!r} is not [A-Za-z0-9_][A-Za-z0-9_.-]{{0,127}}")
    if tag is not None and digest is not None:
        # docker/docker_transport.go: "Docker references with both a tag and digest are currently not supported"
        raise UsageError(what, f"{ref!r}: a tag and a digest together; give one of them")
    # Without a '.' or ':' (or "localhost") the first component is not a registry to docker: "templates/x:t"
    # means docker.io/templates/x:t. Refused, so that what is signed and what is pulled never differ by a guess.
    if not ("." in registry or ":" in registry or registry == "localhost") or not _DOMAIN.fullmatch(registry):
        raise UsageError(what, f"{ref!r}: {registry!r} is not a registry host[:port] (write it out, e.g. "
                               "registry.example.org/templates/NAME:TAG or docker.io/library/NAME:TAG)")
    components = remainder.split("/")
    for part in components:
        if not _PATH_COMPONENT.fullmatch(part):
            low = " (repository paths are lowercase)" if part.lower() != part else ""
            raise UsageError(what, f"{ref!r}: path component {part!r} is not [a-z0-9] words joined by . _ __ or "
                                   f"-{low}")
    if registry == _LEGACY_HUB:
        registry = _DOCKER_HUB
    if registry == _DOCKER_HUB and len(components) == 1:
        remainder = f"library/{remainder}"
    if len(registry) + 1 + len(remainder) > NAME_MAX:
        raise UsageError(what, f"{ref!r}: the repository name is longer than {NAME_MAX} characters")
    return Reference(registry, remainder, tag, digest)


def parse_reference(ref: str) -> Reference:
    """host[:port]/path:tag, as docker's grammar (docker/reference) has it, normalised as containers/image does
    (docker.io). What a signature names and a push goes to. Raises UsageError("oci reference", ...) for anything
    else: no registry host, uppercase or bad path components, a bad or missing tag, a digest."""
    parsed = _parse(ref)
    if parsed.tag is None:
        raise UsageError("oci reference", f"{ref!r}: expected REGISTRY[:PORT]/PATH:TAG (a tag is required)")
    return parsed


def parse_pinned(ref: str) -> Reference:
    """host[:port]/path@sha256:<hex>: an image pinned by its manifest digest. Raises UsageError("oci
    reference", ...) for anything else (a tag, with or without the digest, included)."""
    parsed = _parse(ref)
    if parsed.digest is None or parsed.tag is not None:
        raise UsageError("oci reference", f"{ref!r}: expected REGISTRY[:PORT]/PATH@sha256:<64 hex digits> (by "
                                          "digest only: a tag can be moved by whoever controls the registry)")
    return parsed


def parse_repository(scope: str) -> str:
    """A registry host[:port], or host[:port]/path without tag or digest: a policy.json / registries.d scope
    (a repository or a namespace above repositories). Returned as given. Raises UsageError("oci registry", ...)."""
    if not isinstance(scope, str) or "/" not in scope:
        host = scope if isinstance(scope, str) else ""
        if host and ("." in host or ":" in host or host == "localhost") and _DOMAIN.fullmatch(host):
            return host
        raise UsageError("oci registry", f"{scope!r}: expected REGISTRY[:PORT] or REGISTRY[:PORT]/PATH")
    parsed = _parse(scope, "oci registry")
    if parsed.tag is not None or parsed.digest is not None:
        raise UsageError("oci registry", f"{scope!r}: a scope names a registry or repository path, without a tag "
                                         "or digest")
    if scope != parsed.name:
        # docker.io's normalisation would make the scope name something else than what was written
        raise UsageError("oci registry", f"{scope!r}: write it as containers/image names it: {parsed.name!r}")
    return scope


def _digest(manifest_digest: str) -> str:
    if not isinstance(manifest_digest, str) or not _DIGEST.fullmatch(manifest_digest):
        raise UsageError("oci digest", f"{manifest_digest!r}: expected sha256: and 64 lowercase hex digits")
    return manifest_digest


def payload(reference: str, manifest_digest: str, creator: str, timestamp: int) -> bytes:
    """The signed JSON: canonical (sorted keys, no spaces, ASCII), so the same inputs give the same bytes. The
    identity is the normalised reference (docker.io/library/...). Raises UsageError for a bad reference (a tag is
    required: containers/image refuses a signature naming a bare repository), digest, creator or timestamp."""
    ref = parse_reference(reference)
    digest = _digest(manifest_digest)
    if not isinstance(creator, str) or not creator.isprintable() or len(creator) > 256:
        raise UsageError("oci signature", f"creator {creator!r}: printable, at most 256 characters")
    if isinstance(timestamp, bool) or not isinstance(timestamp, int) or not 0 <= timestamp < 2**53:
        raise UsageError("oci signature", f"timestamp {timestamp!r}: an integer number of seconds since the epoch")
    doc = {"critical": {"identity": {"docker-reference": str(ref)},
                        "image": {"docker-manifest-digest": digest},
                        "type": SIGNATURE_TYPE},
           "optional": {"creator": creator, "timestamp": timestamp}}
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


@dataclass(frozen=True)
class Payload:
    reference: str
    manifest_digest: str
    creator: str | None
    timestamp: int | None


def parse_payload(data: bytes) -> Payload:
    """Read a payload as containers/image does (signature/simple.go, strictUnmarshalJSON): exactly the fields
    critical and optional; critical exactly type, image, identity; the type "atomic container signature".
    Raises UsageError("oci signature", ...) otherwise (the payload of a signature already verified by gpg)."""
    try:
        doc = strictjson.loads(data, what="payload", max_depth=4)
    except strictjson.StrictJSONError as exc:
        raise UsageError("oci signature", str(exc)) from None

    def exact(value: Any, keys: set[str], where: str) -> dict[str, Any]:
        if not isinstance(value, dict) or set(value) != keys:
            raise UsageError("oci signature", f"{where}: expected exactly the fields {sorted(keys)}")
        return value

    top = exact(doc, {"critical", "optional"}, "payload")
    critical = exact(top["critical"], {"type", "image", "identity"}, "critical")
    if critical["type"] != SIGNATURE_TYPE:
        raise UsageError("oci signature", f"type {critical['type']!r}, expected {SIGNATURE_TYPE!r}")
    reference = exact(critical["identity"], {"docker-reference"}, "critical.identity")["docker-reference"]
    digest = exact(critical["image"], {"docker-manifest-digest"}, "critical.image")["docker-manifest-digest"]
    optional = top["optional"]
    if not isinstance(optional, dict):
        raise UsageError("oci signature", "optional: expected an object")
    creator, timestamp = optional.get("creator"), optional.get("timestamp")
    if not isinstance(reference, str) or not isinstance(digest, str) or \
            (creator is not None and not isinstance(creator, str)) or \
            (timestamp is not None and (isinstance(timestamp, bool) or not isinstance(timestamp, int))):
        raise UsageError("oci signature", "docker-reference, docker-manifest-digest and creator are strings, "
                                          "timestamp an integer")
    return Payload(reference, digest, creator, timestamp)


def lookaside_path(reference: str, manifest_digest: str, index: int) -> str:
    """`<repository path>@sha256=<hex>/signature-<index>` (index from 1), relative to the lookaside base: where
    skopeo looks for the index-th signature of the image `manifest_digest` in the repository of `reference`
    (tagged or by digest). The registry host and port are not part of it (docker/registries_d.go).
    Raises UsageError for a bad reference, digest or index."""
    ref = _parse(reference)
    if ref.tag is None and ref.digest is None:
        raise UsageError("oci reference", f"{reference!r}: expected a tag or a digest")
    digest = _digest(manifest_digest)
    if ref.digest is not None and ref.digest != digest:
        raise UsageError("oci digest", f"{reference!r} is pinned to another digest than {digest}")
    if isinstance(index, bool) or not isinstance(index, int) or not 1 <= index <= 999:
        raise UsageError("oci signature", f"index {index!r}: signatures are numbered from 1")
    algorithm, hexdigest = digest.split(":", 1)
    return f"{ref.path}@{algorithm}={hexdigest}/signature-{index}"


def sign(signer, reference: str, manifest_digest: str, *, creator: str | None = None,
         timestamp: int | None = None) -> bytes:
    """The simple-signing signature (a binary OpenPGP signed message over `payload`) saying that `reference`
    (host/path:tag) is the image with manifest `manifest_digest`, made by `signer` (a tmplbuild.sign.Signer)
    with its primary key. `creator` defaults to "tmplbuild <version>", `timestamp` to now.
    Raises UsageError for a bad reference or digest, or when the key cannot sign (Signer.sign_message)."""
    data = payload(reference, manifest_digest, creator if creator is not None else f"tmplbuild {__version__}",
                   int(time.time()) if timestamp is None else timestamp)
    return signer.sign_message(data)


MAX_SIGNATURE = 64 << 10  # a simple signature is a few hundred bytes; a lookaside file above this is not one


def check(verifier, signed: bytes, reference: str, manifest_digest: str) -> None:
    """`signed` is a simple signature by one of `verifier`'s keys (a tmplbuild.sign.Verifier, or a root's online
    keys) saying that `reference` (host/path:tag) is the image `manifest_digest`: what skopeo's signedBy rule with
    exact identity matching accepts. Raises AuthenticityError("oci signature")."""
    if len(signed) > MAX_SIGNATURE:
        raise AuthenticityError("oci signature", f"{len(signed)} bytes, more than a simple signature "
                                                 f"({MAX_SIGNATURE})")
    try:
        _, data = verifier.verify_message(signed)
        got = parse_payload(data)
    except (SignatureError, UsageError) as exc:
        raise AuthenticityError("oci signature", f"{reference}: {exc.message}") from None
    if (got.reference, got.manifest_digest) != (reference, manifest_digest):
        raise AuthenticityError("oci signature", f"signs {got.reference} as {got.manifest_digest}, expected "
                                                 f"{reference} as {manifest_digest}")
