"""Fixtures shared by the real-component tests."""

from __future__ import annotations

from collections.abc import Generator, Iterator
from pathlib import Path

import pluggy
import pytest

from helpers.libvirt_env import DaemonProcess, Domains, connect, start_libvirtd


@pytest.fixture
def domains() -> Iterator[Domains]:
    """Domains on a real libvirtd (qemu:///system), started if none answers.  Never skipped:
    if it cannot start, the test fails and says why.  A connection of the test's own, since a
    test may restart libvirtd."""
    start_libvirtd()
    registry = Domains(connect())
    yield registry
    registry.cleanup()
    registry.conn.close()


@pytest.fixture
def daemon_factory(tmp_path: Path) -> Iterator[object]:
    started: list[DaemonProcess] = []

    def make(roots: list[Path] | None = None, rescan_interval: float = 3600) -> DaemonProcess:
        process = DaemonProcess(
            tmp_path, roots=roots or [tmp_path], rescan_interval=rescan_interval
        )
        started.append(process)
        return process

    yield make
    for process in started:
        process.stop()


#: Lines of each daemon log a failed test shows: what the daemon did before the failure.
LOG_TAIL = 60


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pluggy.Result[pytest.TestReport], None]:
    """A failed test shows the end of each daemon log it left (CI keeps nothing else)."""
    outcome = yield
    report = outcome.get_result()
    tmp_path = getattr(item, "funcargs", {}).get("tmp_path")
    if not report.failed or not isinstance(tmp_path, Path):
        return
    for log in sorted(tmp_path.rglob("daemon-*.log")):
        tail = log.read_text(errors="replace").splitlines()[-LOG_TAIL:]
        report.sections.append((f"daemon log {log.name} (last {len(tail)} lines)", "\n".join(tail)))
