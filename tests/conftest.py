"""Fixtures shared by the real-component tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

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
