"""How the daemon reports a look at a disk (the report is data; no libvirt needed)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from structlog.testing import capture_logs

from virt_bitmapd.config import Settings
from virt_bitmapd.model import Result
from virt_bitmapd.observability.metrics import Metrics
from virt_bitmapd.service.daemon import Daemon
from virt_bitmapd.service.disk_check import CommitReport, DiskReport
from virt_bitmapd.tracking import Commit


def test_a_commit_event_with_no_known_layer_gone_is_reported_unverified(tmp_path: Path) -> None:
    metrics = Metrics()
    daemon = Daemon(Settings(state_dir=str(tmp_path)), metrics=metrics)
    report = DiskReport(
        domain="vm1",
        uuid="u1",
        disk="vda",
        running=True,
        chain=("/i/s3", "/i/base"),
        previous_chain=("/i/base",),
    )
    with capture_logs() as logs:
        daemon._publish(report, "event", "commit", completed=True)
    entry = next(e for e in logs if e["event"] == "reconciliation")
    assert entry["result"] == "skipped" and entry["log_level"] == "warning"
    assert "not verified" in entry["reason"]
    labels = {"trigger": "event", "result": "skipped"}
    assert metrics.registry.get_sample_value("virt_bitmapd_reconciliations_total", labels) == 1


def test_a_look_after_another_event_says_nothing_of_commits(tmp_path: Path) -> None:
    daemon = Daemon(Settings(state_dir=str(tmp_path)), metrics=Metrics())
    report = DiskReport(domain="vm1", uuid="u1", disk="vda", chain=("/i/a",), previous_chain=())
    with capture_logs() as logs:
        daemon._publish(report, "rescan", None)
    assert not [e for e in logs if e["event"] == "reconciliation"]


def test_a_commit_already_handled_by_the_look_at_ready_is_not_reported_unverified(
    tmp_path: Path,
) -> None:
    daemon = Daemon(Settings(state_dir=str(tmp_path)), metrics=Metrics())
    handled = DiskReport(
        domain="vm1",
        uuid="u1",
        disk="vda",
        running=True,
        chain=("/i/base",),
        previous_chain=("/i/top", "/i/base"),
        commits=(
            CommitReport(
                commit=Commit(removed=("/i/top",), base="/i/base"),
                live=True,
                duration=0.1,
                result=Result.ALREADY_CONSISTENT,
            ),
        ),
    )
    unchanged = replace(handled, commits=(), previous_chain=("/i/base",))
    with capture_logs() as logs:
        daemon._publish(handled, "event", None)  # the look started at READY saw the pivot
        daemon._publish(unchanged, "event", "active_commit", completed=True)
    results = [e["result"] for e in logs if e["event"] == "reconciliation"]
    assert results == ["already_consistent"]


def test_the_look_at_ready_finds_no_commit_and_says_nothing_of_it(tmp_path: Path) -> None:
    daemon = Daemon(Settings(state_dir=str(tmp_path)), metrics=Metrics())
    grown = DiskReport(
        domain="vm1", uuid="u1", disk="vda", chain=("/i/o", "/i/a"), previous_chain=("/i/a",)
    )
    with capture_logs() as logs:
        daemon._publish(grown, "event", "active_commit", completed=False)
    assert [e["event"] for e in logs] == ["chain_changed"]
