"""Progress output: each build step prints its name and its duration, so a slow step is visible at once."""
from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager


QUIET = False  # --quiet: no progress and no informational lines (errors, warnings and asked-for data stay)


def say(message: str) -> None:
    """A progress line, on stderr."""
    if not QUIET:
        print(message, file=sys.stderr, flush=True)


def info(message: str) -> None:
    """An informational result line ("fetched and verified ..."), on stdout: what --quiet silences."""
    if not QUIET:
        print(message, flush=True)


@contextmanager
def step(name: str, timings: dict[str, float] | None = None) -> Iterator[None]:
    say(f"==> {name}")
    start = time.monotonic()
    try:
        yield
    finally:
        elapsed = time.monotonic() - start
        if timings is not None:
            timings[name] = timings.get(name, 0.0) + elapsed
    say(f"    {name}: {elapsed:.1f}s")
