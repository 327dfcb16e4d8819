"""Counts the reliability battery's cases and prints the count after the run."""

from __future__ import annotations

import pytest

_outcomes: dict[str, int] = {}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        if "tests/reliability/" in report.nodeid.replace("\\", "/"):
            _outcomes[report.outcome] = _outcomes.get(report.outcome, 0) + 1


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    if _outcomes:
        total = sum(_outcomes.values())
        parts = ", ".join(f"{n} {outcome}" for outcome, n in sorted(_outcomes.items()))
        terminalreporter.write_line(f"reliability battery: {total} cases ran ({parts})")
