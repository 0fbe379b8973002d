"""How the daemon reports a look at a disk (the report is data; no libvirt needed)."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path
from typing import Any

from structlog.testing import capture_logs

from virt_bitmapd.config import Settings
from virt_bitmapd.errors import (
    CrashDamagedBitmaps,
    ImageCorrupt,
    ImageInUse,
    ToolCrashed,
    VirtBitmapdError,
)
from virt_bitmapd.look.findings import CommitReport, LookResult
from virt_bitmapd.model import Result
from virt_bitmapd.observability.metrics import Metrics
from virt_bitmapd.service.daemon import Daemon
from virt_bitmapd.service.disk_memory import COMMIT_ATTEMPTS
from virt_bitmapd.service.scheduler import BlockJob, LookRequest
from virt_bitmapd.service.tasks import TaskSupervisor
from virt_bitmapd.tracking import Commit


def publish(
    daemon: Daemon,
    report: LookResult,
    trigger: str,
    job_type: str | None,
    *,
    completed: bool = False,
) -> None:
    job = None if job_type is None else BlockJob(job_type, completed)
    daemon.applier.publish(report, LookRequest((trigger,), job))


def one_commit(
    removed: str, base: str, *, running: bool = True, kept: tuple[str, ...] = (), **ending: Any
) -> LookResult:
    """A look that found ``removed`` committed into ``base`` (``kept``: the layers above, still
    in the chain); ``ending``: the CommitReport's result or error."""
    return LookResult(
        domain="vm1",
        uuid="u1",
        disk="vda",
        running=running,
        chain=(*kept, base),
        previous_chain=(*kept, removed, base),
        commits=(
            CommitReport(
                commit=Commit(removed=(removed,), base=base),
                live=running,
                duration=0.1,
                **ending,
            ),
        ),
    )


def test_a_commit_event_with_no_known_layer_gone_is_reported_unverified(tmp_path: Path) -> None:
    metrics = Metrics()
    daemon = Daemon(Settings(state_dir=str(tmp_path)), metrics=metrics)
    report = LookResult(
        domain="vm1",
        uuid="u1",
        disk="vda",
        running=True,
        chain=("/i/s3", "/i/base"),
        previous_chain=("/i/base",),
    )
    with capture_logs() as logs:
        publish(daemon, report, "event", "commit", completed=True)
    entry = next(e for e in logs if e["event"] == "reconciliation")
    assert entry["result"] == "skipped" and entry["log_level"] == "warning"
    assert "not verified" in entry["reason"]
    labels = {"trigger": "event", "result": "skipped"}
    assert metrics.registry.get_sample_value("virt_bitmapd_reconciliations_total", labels) == 1


def test_a_look_after_another_event_says_nothing_of_commits(tmp_path: Path) -> None:
    daemon = Daemon(Settings(state_dir=str(tmp_path)), metrics=Metrics())
    report = LookResult(domain="vm1", uuid="u1", disk="vda", chain=("/i/a",), previous_chain=())
    with capture_logs() as logs:
        publish(daemon, report, "rescan", None)
    assert not [e for e in logs if e["event"] == "reconciliation"]


def test_a_commit_already_handled_by_the_look_at_ready_is_not_reported_unverified(
    tmp_path: Path,
) -> None:
    daemon = Daemon(Settings(state_dir=str(tmp_path)), metrics=Metrics())
    handled = one_commit("/i/top", "/i/base", result=Result.ALREADY_CONSISTENT)
    unchanged = replace(handled, commits=(), previous_chain=("/i/base",))
    with capture_logs() as logs:
        publish(daemon, handled, "event", None)  # the look started at READY saw the pivot
        publish(daemon, unchanged, "event", "active_commit", completed=True)
    results = [e["result"] for e in logs if e["event"] == "reconciliation"]
    assert results == ["already_consistent"]


def test_the_look_at_ready_finds_no_commit_and_says_nothing_of_it(tmp_path: Path) -> None:
    daemon = Daemon(Settings(state_dir=str(tmp_path)), metrics=Metrics())
    grown = LookResult(
        domain="vm1", uuid="u1", disk="vda", chain=("/i/o", "/i/a"), previous_chain=("/i/a",)
    )
    with capture_logs() as logs:
        publish(daemon, grown, "event", "active_commit", completed=False)
    assert [e["event"] for e in logs] == ["chain_changed"]


def _failing(error: VirtBitmapdError) -> LookResult:
    return LookResult(domain="vm1", uuid="u1", disk="vda", error=error)


def test_a_disk_failing_the_same_way_is_logged_once_and_counted_in_a_gauge(
    tmp_path: Path,
) -> None:
    metrics = Metrics()
    daemon = Daemon(Settings(state_dir=str(tmp_path)), metrics=metrics)
    corrupt = ImageCorrupt("/i/a.qcow2", "not a qcow2 image QEMU may open: no qcow2 magic")
    with capture_logs() as logs:
        for _ in range(3):
            publish(daemon, _failing(corrupt), "rescan", None)
        publish(daemon, _failing(ImageCorrupt("/i/a.qcow2", "other")), "rescan", None)
    levels = [(e["event"], e["log_level"]) for e in logs]
    assert levels == [
        ("disk_check_failed", "error"),
        ("disk_check_failed", "debug"),
        ("disk_check_failed", "debug"),
        ("disk_check_failed", "error"),  # a new error is news again
    ]
    gauge = metrics.registry.get_sample_value
    assert gauge("virt_bitmapd_disks_in_error", {"kind": "image_corrupt"}) == 1
    assert gauge("virt_bitmapd_disk_errors_total", {"kind": "image_corrupt"}) == 4
    healthy = LookResult(domain="vm1", uuid="u1", disk="vda", chain=("/i/a",))
    with capture_logs() as logs:
        publish(daemon, healthy, "rescan", None)
    assert [e["event"] for e in logs] == ["disk_check_recovered", "chain_changed"]
    assert gauge("virt_bitmapd_disks_in_error", {"kind": "image_corrupt"}) == 0


def test_a_commit_that_may_pass_is_retried_then_counted_failed(tmp_path: Path) -> None:
    metrics = Metrics()
    daemon = Daemon(Settings(state_dir=str(tmp_path)), metrics=metrics)
    held = CommitReport(
        commit=Commit(removed=("/i/top",), base="/i/base"),
        live=False,
        duration=0.1,
        error=ImageInUse("/i/base", "in use by another process"),
    )
    report = LookResult(
        domain="vm1",
        uuid="u1",
        disk="vda",
        chain=("/i/base",),
        previous_chain=("/i/top", "/i/base"),
        commits=(held,),
    )
    failed = {"trigger": "rescan", "result": "failed"}

    async def publish_all() -> list[str]:
        events = []
        for _ in range(COMMIT_ATTEMPTS):
            with capture_logs() as logs:
                publish(daemon, report, "rescan", None)
            events += [e["event"] for e in logs]
        return events

    events = asyncio.run(publish_all())
    assert events.count("reconciliation_deferred") == COMMIT_ATTEMPTS - 1
    assert events.count("reconciliation") == 1 and "chain_changed" not in events
    assert metrics.registry.get_sample_value("virt_bitmapd_reconciliations_total", failed) == 1


def test_a_background_step_that_raises_is_logged_counted_and_runs_again() -> None:
    failures: list[str] = []
    runs = []

    async def step() -> None:
        runs.append(1)
        raise RuntimeError("boom")

    async def main() -> None:
        supervisor = TaskSupervisor(failures.append)
        supervisor.every("snapshot_watch", lambda: 0.01, step)
        await asyncio.sleep(0.2)
        supervisor.cancel_all()
        await asyncio.sleep(0)

    with capture_logs() as logs:
        asyncio.run(main())
    assert len(runs) >= 3 and failures == ["snapshot_watch"] * len(runs)
    assert logs[0]["event"] == "background_task_failed" and logs[0]["exc_info"]


def test_two_commit_events_within_a_minute_each_get_their_line(tmp_path: Path) -> None:
    """The second commit took only layers no look saw: its event still gets its own line, not
    hidden by the first commit handled a moment before."""
    daemon = Daemon(Settings(state_dir=str(tmp_path)), metrics=Metrics())
    first = one_commit("/i/s1", "/i/base", kept=("/i/active",), result=Result.ALREADY_CONSISTENT)
    second = replace(
        first, commits=(), chain=("/i/o2", "/i/active", "/i/base"), previous_chain=first.chain
    )
    with capture_logs() as logs:
        publish(daemon, first, "event", "commit", completed=True)
        publish(daemon, second, "event", "commit", completed=True)
    results = [e["result"] for e in logs if e["event"] == "reconciliation"]
    assert results == ["already_consistent", "skipped"]


def test_a_tool_crash_behind_a_failure_is_counted(tmp_path: Path) -> None:
    metrics = Metrics()
    daemon = Daemon(Settings(state_dir=str(tmp_path)), metrics=metrics)
    crash = ToolCrashed("qemu-storage-daemon was killed by SIGABRT unexpectedly")
    damaged = CrashDamagedBitmaps("/i/base", str(crash), ("cp1",))
    damaged.__cause__ = crash
    report = one_commit("/i/s1", "/i/base", running=False, error=damaged)
    with capture_logs() as logs:
        publish(daemon, report, "rescan", None)
    line = next(e for e in logs if e["event"] == "reconciliation")
    assert line["result"] == "unrecoverable" and line["untrusted"] == ["cp1"]
    assert metrics.registry.get_sample_value("virt_bitmapd_tool_crashes_total") == 1
