"""Progress output: each build step prints its name and its duration, so a slow step is visible at once."""
from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


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
