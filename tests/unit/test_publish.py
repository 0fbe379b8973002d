"""How the daemon reports a look at a disk (the report is data; no libvirt needed)."""

from __future__ import annotations

from pathlib import Path

from structlog.testing import capture_logs

from virt_bitmapd.config import Settings
from virt_bitmapd.observability.metrics import Metrics
from virt_bitmapd.service.daemon import Daemon
from virt_bitmapd.service.disk_check import DiskReport


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
        daemon._publish(report, "event", "commit")
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
