"""Typed exceptions. Library code raises these; only the CLI turns them into exit codes and one-line messages.

Each class carries the exit category from DESIGN.md, so a new failure mode picks its exit code by picking its
class, never by a number scattered through the code.
"""
from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    OK = 0
    INTERNAL = 1
    USAGE = 2
    AUTHENTICITY = 3
    FRESHNESS = 4
    TRANSPORT = 5
    UNSAFE_ARCHIVE = 6
    LOCAL_IO = 7
    TEMPLATE_TEST = 8


class TmplbuildError(Exception):
    """Base class. `check` names the check that failed; it leads the one-line message."""

    exit_code: ExitCode = ExitCode.INTERNAL

    def __init__(self, check: str, message: str) -> None:
        super().__init__(f"{check}: {message}")
        self.check = check
        self.message = message


class UsageError(TmplbuildError):
    """Bad command line or configuration (exit 2)."""

    exit_code = ExitCode.USAGE


class RecipeError(UsageError):
    """A recipe that cannot be used: names file:line and the field (exit 2)."""

    def __init__(self, path: str, line: int | None, field: str, message: str) -> None:
        where = f"{path}:{line}" if line else path
        super().__init__(f"recipe {where}", f"{field}: {message}" if field else message)
        self.path = path
        self.line = line
        self.field = field


class AuthenticityError(TmplbuildError):
    """Signature, key, hash or size check failed (exit 3)."""

    exit_code = ExitCode.AUTHENTICITY


class SignatureError(AuthenticityError):
    """The signature itself: missing, bad, by a key that is not pinned, or made with a weak key or digest
    (exit 3). A type of its own, so callers that retry a racing index/signature pair need not read messages."""

    def __init__(self, check: str = "signature", message: str = "") -> None:
        super().__init__(check, message)


class FreshnessError(TmplbuildError):
    """Expired, future or rolled-back metadata (exit 4)."""

    exit_code = ExitCode.FRESHNESS


class TransportError(TmplbuildError):
    """HTTP error, timeout, truncated or oversized download (exit 5)."""

    exit_code = ExitCode.TRANSPORT


class OversizeError(TransportError):
    """A download larger than its cap or its signed size (exit 5): never worth keeping to resume."""

    def __init__(self, check: str = "download size", message: str = "") -> None:
        super().__init__(check, message)


class UnsafeContentError(TmplbuildError):
    """Archive or tree content that must not be shipped or unpacked (exit 6)."""

    exit_code = ExitCode.UNSAFE_ARCHIVE


class LocalIOError(TmplbuildError):
    """Disk full, permissions, lock held (exit 7)."""

    exit_code = ExitCode.LOCAL_IO


class PublishConflictError(TmplbuildError):
    """`publish --to`: every attempt until the publish deadline lost the race to another publisher (409). Not a
    transport failure (5): every request got a well-formed answer. It is DESIGN.md's "lock held" (7): the
    repository was held by other publishers for the whole wait, exactly what a local publish reports when it
    cannot get the repository lock within its wait (store.locked, exit 7), so scripts see one code for "busy,
    try later" whether they publish with --repo or --to."""

    exit_code = ExitCode.LOCAL_IO


class BuildError(TmplbuildError):
    """A build step (debootstrap, a stage script, apt) failed. Not a bug in tmplbuild, so not exit 1:
    the recipe or its scripts are at fault, which DESIGN.md files under 'recipe error' (exit 2)."""

    exit_code = ExitCode.USAGE


class TemplateTestError(TmplbuildError):
    """`tmplbuild test`: the template booted in a container manager and a check failed (exit 8). Not 3: the
    template is authentic and intact, it just does not work as a container; not 2: the command was right."""

    exit_code = ExitCode.TEMPLATE_TEST


class EnvironmentUnfitError(UsageError):
    """This host cannot run what was asked (a container manager missing, not root): exit 2."""
