"""The one place that executes subprocesses: argv lists only, never a shell string, and the exact command in
the error when it fails."""
from __future__ import annotations

import os
import shlex
import signal
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from tmplbuild.errors import BuildError, TmplbuildError

# What a build step sees: nothing of the caller's locale, proxies or Python settings leaks into the chroot.
CLEAN_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LC_ALL": "C.UTF-8",
    "LANG": "C.UTF-8",
    "HOME": "/root",
    "DEBIAN_FRONTEND": "noninteractive",
    "DEBCONF_NONINTERACTIVE_SEEN": "true",
}


def command_line(argv: Sequence[str | os.PathLike[str]]) -> str:
    return shlex.join(str(a) for a in argv)


def run(
    argv: Sequence[str | os.PathLike[str]],
    *,
    check: str,
    env: Mapping[str, str] | None = None,
    log: Path | None = None,
    input: bytes | None = None,
    capture: bool = False,
    error: type[TmplbuildError] = BuildError,
) -> subprocess.CompletedProcess[bytes]:
    """Run argv. `check` names the step for the error line. Output goes to `log` (appended) when given, is
    captured when `capture`, else inherits the terminal. Raises `error` (BuildError by default) on a non-zero
    exit, with the last lines of the log so the one-line message says why; raises LocalIOError-free: a missing
    program is reported as the same error class."""
    full_env = dict(CLEAN_ENV)
    if env:
        full_env.update(env)
    argv = [str(a) for a in argv]
    stdout: int | object
    logf = None
    if capture:
        stdout = subprocess.PIPE
    elif log is not None:
        logf = open(log, "ab")
        logf.write(f"$ {command_line(argv)}\n".encode())
        logf.flush()
        stdout = logf
    else:
        stdout = None
    try:
        # Its own session: on Ctrl-C or an error here the whole group (debootstrap and its dpkg children,
        # a script's background jobs) is killed, not just the direct child, before the tree is torn down.
        proc = subprocess.Popen(
            argv,
            env=full_env,
            stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=stdout,  # type: ignore[arg-type]
            stderr=subprocess.PIPE if capture else (subprocess.STDOUT if logf else None),
            start_new_session=True,
        )
    except FileNotFoundError as exc:
        if logf:
            logf.close()
        raise error(check, f"cannot run {argv[0]}: {exc.strerror}") from None
    try:
        out, err = proc.communicate(input)
    except BaseException:
        kill_group(proc)
        raise
    finally:
        if logf:
            logf.close()
    proc = subprocess.CompletedProcess(argv, proc.returncode, out, err)
    if proc.returncode != 0:
        detail = ""
        if capture and proc.stderr:
            detail = _last_line(proc.stderr.decode(errors="replace"))
        elif log is not None:
            detail = _last_line(log.read_text(errors="replace")) + f" (full log: {log})"
        raise error(check, f"`{command_line(argv)}` exited {proc.returncode}" + (f": {detail}" if detail else ""))
    return proc


def host_arch() -> str | None:
    """The host's Debian architecture (dpkg --print-architecture), or None when dpkg cannot tell."""
    try:
        out = run(["dpkg", "--print-architecture"], check="arch", capture=True).stdout
    except TmplbuildError:
        return None
    arch = out.decode(errors="replace").strip()
    return arch or None


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the process group `proc` leads (it was started with start_new_session) and reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:300] if lines else ""
