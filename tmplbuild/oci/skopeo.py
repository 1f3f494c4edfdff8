"""skopeo, the one tool that talks to registries: push an oci-archive, pull an image by digest into one, ask
which digest a tag points at.

The argv builders are pure (tested without skopeo); the runners go through tmplbuild.run.run and turn skopeo's
fatal stderr line into one typed, one-line error naming the reference and skopeo's reason (`classify`):

| skopeo says | raised |
| --- | --- |
| no space left on device, permission denied (local files) | LocalIOError("registry") (7) |
| unauthorized, authentication required, denied, 401/403 | UsageError("registry auth") (2): configuration |
| TLS/x509 failures, HTTP answer to an HTTPS client | TransportError("registry") (5) |
| connection refused, no such host, timeouts | TransportError("registry") (5) |
| manifest unknown, name unknown, not found | TransportError("registry") (5) |
| anything else | TransportError("registry") (5) |
| skopeo missing | UsageError("skopeo") (2), with the apt-get line |

Our own operations never read the host's policy.json or registries.d: each run gets a private accept-all policy
and an empty registries.d. That is safe because nothing here trusts what it copies on skopeo's say: a push sends
our own archive and returns the digest the registry stored (the caller compares it with the archive's), and a
pull is by digest only (skopeo checks the manifest against it, `--preserve-digests` forbids conversion, and the
archive is checked again here). Signatures are never copied (`--remove-signatures`): tmplbuild signs on its own
(tmplbuild.oci.simplesign) and an oci-archive cannot hold them. Credentials come from `--authfile` or skopeo's
own default (`$REGISTRY_AUTH_FILE`, `${XDG_RUNTIME_DIR}/containers/auth.json`, `~/.docker/config.json`):
a password never appears on a command line.

TLS verification is on unless a caller turns it off explicitly (the CLI's `--oci-insecure-registry`); then every
run says so on stderr. It is also passed as `=true` explicitly, so a registries.conf marking the registry
insecure cannot turn it off silently.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tmplbuild.errors import AuthenticityError, LocalIOError, TmplbuildError, TransportError, UsageError
from tmplbuild.oci.simplesign import Reference, parse_pinned, parse_reference
from tmplbuild.run import CLEAN_ENV, run

SKOPEO = "skopeo"
ACCEPT_ALL_POLICY = b'{"default": [{"type": "insecureAcceptAnything"}]}\n'
DEFAULT_TIMEOUT = 1800  # seconds for a whole skopeo run (--command-timeout): a stalled registry ends, one day
INSPECT_TIMEOUT = 120
# What skopeo may still see of the caller's environment (tmplbuild.run starts from a clean one): where the
# credentials are, proxies, and extra CA certificates. Nothing else leaks in.
PASSED_ENV = ("HOME", "XDG_RUNTIME_DIR", "XDG_CONFIG_HOME", "REGISTRY_AUTH_FILE", "DOCKER_CONFIG", "TMPDIR",
              "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy", "SSL_CERT_FILE",
              "SSL_CERT_DIR")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_MSG = re.compile(r'msg="((?:[^"\\]|\\.)*)"')
MAX_INDEX = 1 << 20  # an oci-archive's index.json: a few hundred bytes

# (pattern in skopeo's message, error class, check, what it means), first match wins.
_CLASSES: tuple[tuple[re.Pattern[str], type[TmplbuildError], str, str], ...] = (
    (re.compile(r"digest did not match|manifest digest .* does not match|does not match digest", re.I),
     AuthenticityError, "oci digest", "the registry sent bytes that are not the digest asked for"),
    (re.compile(r"no space left on device|disk quota exceeded|read-only file system|permission denied", re.I),
     LocalIOError, "registry", "cannot write locally"),
    (re.compile(r"unauthorized|authentication required|incorrect username or password|access to the resource "
                r"is denied|(?:^|: )denied:|\b40[13]\b", re.I), UsageError, "registry auth",
     "the registry refused our credentials"),
    (re.compile(r"x509:|tls:|certificate|server gave HTTP response to HTTPS client", re.I), TransportError,
     "registry", "TLS failure"),
    (re.compile(r"connection refused|no such host|i/o timeout|timeout|deadline exceeded|connection reset|"
                r"network is unreachable|no route to host|EOF", re.I), TransportError, "registry",
     "cannot reach the registry"),
    (re.compile(r"manifest unknown|name unknown|not found|blob unknown", re.I), TransportError, "registry",
     "not in the registry"),
)


class _Failed(TmplbuildError):
    """skopeo exited non-zero (its output is in the run's log). Never escapes this module."""


# -- argv builders (pure) -----------------------------------------------------------------------------------------

def _global(policy: Path, registries_d: Path, timeout: float | None) -> list[str]:
    argv = [SKOPEO, "--policy", str(policy), "--registries.d", str(registries_d)]
    if timeout is not None:
        argv += ["--command-timeout", f"{int(timeout)}s"]
    return argv


def _tls(flag: str, tls_verify: bool) -> str:
    return f"{flag}={'true' if tls_verify else 'false'}"


def _archive(path: Path) -> str:
    # oci-archive:PATH[:IMAGE] splits at the first ':' (containers/image internal SplitPathAndImage)
    if ":" in str(path):
        raise UsageError("oci archive", f"{path}: skopeo cannot take a path with ':' in an oci-archive: name")
    return f"oci-archive:{path}"


def push_argv(archive: Path | str, reference: str, *, policy: Path, registries_d: Path, digestfile: Path,
              tls_verify: bool = True, authfile: Path | None = None,
              timeout: float | None = DEFAULT_TIMEOUT) -> list[str]:
    """`skopeo copy --preserve-digests` of the oci-archive to docker://reference (host/path:tag); `archive` may
    instead be a reference already in the same registry (host/path@sha256:...), to tag it without reading the
    archive again. Raises UsageError for a bad reference or archive path."""
    ref = parse_reference(reference)
    argv = _global(policy, registries_d, timeout) + [
        "copy", "--preserve-digests", "--remove-signatures", "--digestfile", str(digestfile),
        _tls("--dest-tls-verify", tls_verify)]
    if isinstance(archive, str):
        argv += [_tls("--src-tls-verify", tls_verify)]
        source = f"docker://{parse_pinned(archive)}"
    else:
        source = _archive(archive)
    if authfile is not None:
        argv += ["--authfile", str(authfile)]
    return argv + [source, f"docker://{ref}"]


def pull_argv(reference: str, dest: Path, *, policy: Path, registries_d: Path, tls_verify: bool = True,
              authfile: Path | None = None, timeout: float | None = DEFAULT_TIMEOUT) -> list[str]:
    """`skopeo copy docker://host/path@sha256:... oci-archive:dest`. Raises UsageError unless the reference is
    pinned by digest (a tag is refused), or for a bad archive path."""
    ref = parse_pinned(reference)
    argv = _global(policy, registries_d, timeout) + [
        "copy", "--preserve-digests", "--remove-signatures", _tls("--src-tls-verify", tls_verify)]
    if authfile is not None:
        argv += ["--authfile", str(authfile)]
    return argv + [f"docker://{ref}", _archive(dest)]


def pull_layout_argv(reference: str, layout: Path, *, policy: Path, registries_d: Path, tls_verify: bool = True,
                     authfile: Path | None = None, timeout: float | None = DEFAULT_TIMEOUT) -> list[str]:
    """`skopeo copy docker://host/path@sha256:... oci:LAYOUT:pull`: the image's blobs as they are, in an OCI image
    layout directory. Raises UsageError unless the reference is pinned by digest, or for a path with ':'."""
    ref = parse_pinned(reference)
    if ":" in str(layout):
        raise UsageError("oci layout", f"{layout}: skopeo cannot take a path with ':' in an oci: name")
    argv = _global(policy, registries_d, timeout) + [
        "copy", "--preserve-digests", "--remove-signatures", _tls("--src-tls-verify", tls_verify)]
    if authfile is not None:
        argv += ["--authfile", str(authfile)]
    return argv + [f"docker://{ref}", f"oci:{layout}:pull"]


def inspect_argv(reference: str, *, policy: Path, registries_d: Path, tls_verify: bool = True,
                 authfile: Path | None = None, timeout: float | None = INSPECT_TIMEOUT) -> list[str]:
    """`skopeo inspect --no-tags --format {{.Digest}} docker://host/path:tag`: the digest of the manifest the tag
    points at. Raises UsageError for a bad reference."""
    ref = parse_reference(reference)
    argv = _global(policy, registries_d, timeout) + ["inspect", "--no-tags", "--format", "{{.Digest}}",
                                                     _tls("--tls-verify", tls_verify)]
    if authfile is not None:
        argv += ["--authfile", str(authfile)]
    return argv + [f"docker://{ref}"]


# -- runners --------------------------------------------------------------------------------------------------

def push(archive: Path | str, reference: str, *, tls_verify: bool = True, authfile: Path | None = None,
         timeout: float | None = DEFAULT_TIMEOUT) -> str:
    """Push the oci-archive `archive` (or, to tag it again, the image `host/path@sha256:...` already in that
    registry) to `reference` (host/path:tag) and return the manifest digest the registry stored ("sha256:<hex>").
    The caller must refuse a digest other than the archive's manifest digest.
    Raises UsageError (bad reference, no archive, credentials refused, no skopeo), TransportError (registry
    unreachable, TLS failure, bad answer), LocalIOError (local disk)."""
    ref = parse_reference(reference)
    if isinstance(archive, Path):
        _check_file(archive, "oci archive")
    _check_file(authfile, "registry auth")
    _warn_insecure(ref, tls_verify)
    with _private() as (policy, registries_d):
        digestfile = policy.parent / "digest"
        _skopeo(push_argv(archive, reference, policy=policy, registries_d=registries_d, digestfile=digestfile,
                          tls_verify=tls_verify, authfile=authfile, timeout=timeout), ref, "push", policy.parent)
        try:
            stored = digestfile.read_text(encoding="ascii", errors="replace").strip()
        except OSError:
            stored = ""
    if not _DIGEST.fullmatch(stored):
        raise TransportError("registry", f"push {ref}: skopeo reported no manifest digest after the push "
                                         f"({stored[:80]!r})")
    return stored


def pull(reference: str, dest_archive: Path, *, tls_verify: bool = True, authfile: Path | None = None,
         timeout: float | None = DEFAULT_TIMEOUT) -> None:
    """Copy the image `reference` (host/path@sha256:<hex>, by digest only) into the oci-archive `dest_archive`,
    through a hidden temporary name renamed into place only once its single manifest is that digest.
    Raises UsageError (a reference with a tag or without a digest, credentials refused, no skopeo),
    TransportError (registry unreachable, no such image), AuthenticityError (the archive holds another
    manifest), LocalIOError (cannot write the destination)."""
    ref = parse_pinned(reference)
    _check_file(authfile, "registry auth")
    if not dest_archive.parent.is_dir():
        raise LocalIOError("oci pull", f"{dest_archive.parent}: no such directory")
    _warn_insecure(ref, tls_verify)
    part = dest_archive.with_name(f".{dest_archive.name}.part")
    try:
        part.unlink(missing_ok=True)
        with _private() as (policy, registries_d):
            _skopeo(pull_argv(reference, part, policy=policy, registries_d=registries_d, tls_verify=tls_verify,
                              authfile=authfile, timeout=timeout), ref, "pull", policy.parent)
        got = archive_manifest_digest(part)
        if got != ref.digest:
            raise AuthenticityError("oci digest", f"{ref}: skopeo wrote an archive holding manifest {got}")
        os.replace(part, dest_archive)
    except OSError as exc:
        raise LocalIOError("oci pull", f"{dest_archive}: {exc.strerror}") from None
    finally:
        try:
            part.unlink(missing_ok=True)
        except OSError:
            pass


def pull_layout(reference: str, layout: Path, *, tls_verify: bool = True, authfile: Path | None = None,
                timeout: float | None = DEFAULT_TIMEOUT) -> None:
    """Copy the image `reference` (by digest only) into the new OCI image layout directory `layout`, blobs as the
    registry sent them: the caller checks each against what it trusts (tmplbuild.oci.image.assemble). Raises
    UsageError (a reference without a digest, credentials refused, no skopeo), TransportError (registry
    unreachable, no such image), LocalIOError."""
    ref = parse_pinned(reference)
    _check_file(authfile, "registry auth")
    _warn_insecure(ref, tls_verify)
    with _private() as (policy, registries_d):
        _skopeo(pull_layout_argv(reference, layout, policy=policy, registries_d=registries_d, tls_verify=tls_verify,
                                 authfile=authfile, timeout=timeout), ref, "pull", policy.parent)


def inspect_digest(reference: str, *, tls_verify: bool = True, authfile: Path | None = None,
                   timeout: float | None = INSPECT_TIMEOUT) -> str:
    """The manifest digest ("sha256:<hex>") the tag `reference` points at now (skopeo computes it over the raw
    manifest bytes the registry serves). Raises like `push`; TransportError when the tag does not exist."""
    ref = parse_reference(reference)
    _check_file(authfile, "registry auth")
    _warn_insecure(ref, tls_verify)
    with _private() as (policy, registries_d):
        out = _skopeo(inspect_argv(reference, policy=policy, registries_d=registries_d, tls_verify=tls_verify,
                                   authfile=authfile, timeout=timeout), ref, "inspect", policy.parent)
    # The digest is the one line that is nothing but a digest (warnings, if any, are logrus lines).
    found = [ln.strip() for ln in out.splitlines() if _DIGEST.fullmatch(ln.strip())]
    if len(found) != 1:
        raise TransportError("registry", f"inspect {ref}: skopeo printed no manifest digest")
    return found[0]


def archive_manifest_digest(archive: Path) -> str:
    """The digest of the one manifest an oci-archive's index.json lists. Raises AuthenticityError when the
    archive is not an oci-archive with exactly one manifest, OSError when it cannot be read."""
    try:
        with tarfile.open(archive, "r:") as tar:
            member = next((m for m in tar if m.name.removeprefix("./") == "index.json"), None)
            if member is None or not member.isfile() or member.size > MAX_INDEX:
                raise AuthenticityError("oci archive", f"{archive}: no index.json (or an oversized one)")
            f = tar.extractfile(member)
            index = json.loads(f.read() if f else b"")
    except (tarfile.TarError, ValueError) as exc:
        raise AuthenticityError("oci archive", f"{archive}: not an oci-archive ({exc})") from None
    manifests = index.get("manifests") if isinstance(index, dict) else None
    if not isinstance(manifests, list) or len(manifests) != 1 or not isinstance(manifests[0], dict) \
            or not _DIGEST.fullmatch(str(manifests[0].get("digest"))):
        raise AuthenticityError("oci archive", f"{archive}: index.json must list exactly one sha256 manifest")
    return str(manifests[0]["digest"])


# -- helpers --------------------------------------------------------------------------------------------------

def _warn_insecure(ref: Reference, tls_verify: bool) -> None:
    if not tls_verify:
        print(f"tmplbuild: warning: TLS verification is OFF for {ref.registry}", file=sys.stderr, flush=True)


def _check_file(path: Path | None, check: str) -> None:
    if path is not None and not path.is_file():
        raise UsageError(check, f"{path}: no such file")


@contextmanager
def _private() -> Iterator[tuple[Path, Path]]:
    """A private directory (0700) with the accept-all policy and an empty registries.d, removed afterwards."""
    try:
        tmp = Path(tempfile.mkdtemp(prefix="tmplbuild-skopeo-"))
        (tmp / "policy.json").write_bytes(ACCEPT_ALL_POLICY)
        (tmp / "registries.d").mkdir()
    except OSError as exc:
        raise LocalIOError("oci", f"cannot make a temporary directory: {exc.strerror}") from None
    try:
        yield tmp / "policy.json", tmp / "registries.d"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _skopeo(argv: list[str], ref: Reference, what: str, workdir: Path) -> str:
    """Run skopeo with its stdout and stderr in a log in `workdir`; the log. Raises the classified error (see
    the module docstring)."""
    if shutil.which(SKOPEO, path=CLEAN_ENV["PATH"]) is None:
        raise UsageError("skopeo", "skopeo is not installed: install it: apt-get install skopeo")
    env = {k: os.environ[k] for k in PASSED_ENV if k in os.environ}
    log = workdir / "skopeo.log"
    try:
        # A log rather than capture: run() keeps only 300 characters of the last stderr line, and skopeo's
        # message names the reference twice before the words that classify it.
        run(argv, check=f"skopeo {what}", env=env, log=log, error=_Failed)
    except _Failed as exc:
        if exc.message.startswith("cannot run"):
            raise UsageError("skopeo", f"{exc.message}: install it: apt-get install skopeo") from None
        try:
            text = log.read_text(encoding="utf-8", errors="replace")
        except OSError:
            text = exc.message
        raise classify(last_error_line(text), ref, what) from None
    try:
        return log.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise LocalIOError("oci", f"{log}: {exc.strerror}") from None


def last_error_line(output: str) -> str:
    """skopeo's fatal line in its output (the last `level=fatal` line, else the last line that is not run()'s
    `$ command` header). Raises nothing."""
    lines = [ln for ln in output.splitlines() if ln.strip() and not ln.startswith("$ ")]
    fatal = [ln for ln in lines if "level=fatal" in ln]
    return (fatal or lines or [""])[-1]


def reason_of(line: str) -> str:
    """skopeo's own words in its fatal stderr line: logrus's msg="..." unquoted, else the line itself, on one
    line. Raises nothing."""
    m = _MSG.search(line)
    if m:
        line = re.sub(r"\\(.)", r"\1", m.group(1))
    return " ".join(line.split()) or "skopeo gave no reason"


def classify(line: str, ref: Reference | str, what: str = "copy") -> TmplbuildError:
    """The typed error for a failed skopeo run about `ref` whose fatal stderr line is `line`: matched on the
    whole reason, shown by its last 300 characters (skopeo's cause comes last). Raises nothing."""
    reason = reason_of(line)
    shown = reason if len(reason) <= 300 else "..." + reason[-300:]
    for pattern, cls, check, meaning in _CLASSES:
        if pattern.search(reason):
            hint = " (give the registry's credentials with --authfile or `skopeo login`)" \
                if check == "registry auth" else ""
            return cls(check, f"{what} {ref}: {meaning}: {shown}{hint}")
    return TransportError("registry", f"{what} {ref}: skopeo failed: {shown}")
