"""The boot check waits through a container's first moments instead of failing them: before PID 1 is systemd,
or before it opened its bus, `systemctl` answers "offline" or "Failed to connect to bus"; on a loaded host that
lasted long enough to fail a template that boots fine (seen in CI). Asked again until the deadline, the answer
is the container's real state."""
from __future__ import annotations

import time
from pathlib import Path

from tmplbuild.boot import checks
from tmplbuild.boot.managers import Container, Result


class Answers(Container):
    def __init__(self, answers: list[str]) -> None:
        super().__init__(name="c1", rootfs=Path("/nonexistent"), interface="eth0", log=Path("/nonexistent"))
        self.answers = answers
        self.asked: list[tuple[str, ...]] = []

    def exec(self, *argv: str, timeout: float = 30.0) -> Result:
        self.asked.append(argv)
        if argv[:2] == ("systemctl", "is-system-running"):
            out = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
            return Result(0 if out.strip() == "running" else 1, out)
        return Result(0, "")

    def alive(self) -> bool:
        return True


def test_offline_and_no_bus_at_first_are_asked_again():
    c = Answers(["offline\n", "Failed to connect to bus: No such file or directory\n", "running\n"])
    check, booted = checks.boot([c], time.monotonic() + 5)
    assert check.status == checks.PASS, check.evidence
    assert booted["c1"] is not None


def test_offline_until_the_deadline_still_fails():
    c = Answers(["offline\n"])
    check, _ = checks.boot([c], time.monotonic() + 0.5)
    assert check.status == checks.FAIL and "offline" in check.evidence
