"""Prometheus metrics, prefixed ``virt_bitmapd_``, in a registry of their own."""

from __future__ import annotations

import time
from collections.abc import Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.exposition import start_http_server

from .. import __version__
from .disk_states import BITMAP_STATES, CHECKPOINT_STATES, DiskStates

__all__ = ["BITMAP_STATES", "CHECKPOINT_STATES", "RESULTS", "TRIGGERS", "Metrics"]

TRIGGERS = ("event", "watch", "rescan", "startup", "manual", "check")
RESULTS = (
    "reconciled",
    "already_consistent",
    "nothing_to_do",
    "unrecoverable",
    "failed",
    "skipped",
)
# Reconciliations take from tens of milliseconds (verification) to minutes (huge bitmaps).
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.build_info = Info("virt_bitmapd_build", "Version of virt-bitmapd", registry=r)
        self.build_info.info({"version": __version__})
        self.libvirt_connected = Gauge(
            "virt_bitmapd_libvirt_connected",
            "1 while the connection to libvirtd is open, else 0",
            registry=r,
        )
        self.libvirt_reconnects = Counter(
            "virt_bitmapd_libvirt_reconnects_total",
            "Connections to libvirtd opened again after one was lost",
            registry=r,
        )
        self.block_job_events = Counter(
            "virt_bitmapd_block_job_events_total",
            "libvirt block job events received",
            ["type", "status"],
            registry=r,
        )
        self.reconciliations = Counter(
            "virt_bitmapd_reconciliations_total",
            "Commits handled, by what noticed them and how it ended",
            ["trigger", "result"],
            registry=r,
        )
        self.duration = Histogram(
            "virt_bitmapd_reconciliation_duration_seconds",
            "Time to verify or reconcile one commit",
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.disk_errors = Counter(
            "virt_bitmapd_disk_errors_total",
            "Looks at a disk that failed before any commit could be judged, by error kind",
            ["kind"],
            registry=r,
        )
        self.bitmaps_added = Counter(
            "virt_bitmapd_bitmaps_added_total", "Bitmaps created in a commit base", registry=r
        )
        self.bitmaps_merged = Counter(
            "virt_bitmapd_bitmaps_merged_total",
            "Bitmaps merged into a commit base (created ones included)",
            registry=r,
        )
        self.disk_states = DiskStates()
        r.register(self.disk_states)
        self.quarantines = Counter(
            "virt_bitmapd_quarantines_total",
            "Untrusted bitmaps disabled so that libvirt refuses backups from them (disabled), "
            "and attempts that failed (failed)",
            ["result"],
            registry=r,
        )
        self.fills = Counter(
            "virt_bitmapd_fills_total",
            "Untrusted bitmaps given every bit, so that every reader's next incremental backup "
            "from them copies the whole disk (filled), and attempts that failed (failed)",
            ["result"],
            registry=r,
        )
        self.heals = Counter(
            "virt_bitmapd_heals_total",
            "Checkpoint bitmap copies rebuilt from an overlay's allocated clusters (healed), "
            "and attempts that failed (failed)",
            ["result"],
            registry=r,
        )
        self.disks_in_error = Gauge(
            "virt_bitmapd_disks_in_error",
            "Disks whose last look failed, by error kind",
            ["kind"],
            registry=r,
        )
        self.background_errors = Counter(
            "virt_bitmapd_background_errors_total",
            "Exceptions raised by a background task (it goes on), by task",
            ["task"],
            registry=r,
        )
        self.tool_crashes = Counter(
            "virt_bitmapd_tool_crashes_total",
            "QEMU tools (qemu-img, qemu-storage-daemon) that died by a signal in the middle of "
            "their work",
            registry=r,
        )
        self.leftovers_removed = Counter(
            "virt_bitmapd_leftovers_removed_total",
            "What an earlier run left, removed, by kind: QEMU jobs and nodes, probe bitmaps, tool "
            "processes",
            ["kind"],
            registry=r,
        )
        self.watched_directories = Gauge(
            "virt_bitmapd_watched_directories",
            "Directories watched for new layers (those holding known layers, and the storage "
            "roots)",
            registry=r,
        )
        self.rescan_unread = Counter(
            "virt_bitmapd_rescan_unread_disks_total",
            "Disks a periodic rescan left unread because nothing said they changed (a stat per "
            "layer; a running domain's XML and checkpoint list)",
            registry=r,
        )
        self.last_success = Gauge(
            "virt_bitmapd_last_success_timestamp_seconds",
            "Unix time of the last reconciliation that ended well",
            registry=r,
        )
        for trigger in TRIGGERS:
            for result in RESULTS:
                self.reconciliations.labels(trigger, result)
        for result in ("disabled", "failed"):
            self.quarantines.labels(result)
        for result in ("healed", "failed"):
            self.heals.labels(result)
        for result in ("filled", "failed"):
            self.fills.labels(result)
        self.libvirt_connected.set(0)
        self._error_kinds: set[str] = set()

    def record(
        self, *, trigger: str, result: str, duration: float, added: int = 0, merged: int = 0
    ) -> None:
        self.reconciliations.labels(trigger, result).inc()
        self.duration.observe(duration)
        self.bitmaps_added.inc(added)
        self.bitmaps_merged.inc(merged)
        if result in ("reconciled", "already_consistent", "nothing_to_do"):
            self.last_success.set(time.time())

    def set_disk_bitmaps(
        self, domain: str, disk: str, states: Mapping[str, int], untrusted: int
    ) -> None:
        """What the last look at one disk found; totals are kept per host and per domain."""
        self.disk_states.set_bitmaps(domain, disk, states, untrusted)

    def set_disk_checkpoints(
        self,
        domain: str,
        disk: str,
        states: Mapping[str, int],
        verdicts: tuple[tuple[str, str, int], ...] = (),
    ) -> None:
        """How many of one disk's checkpoints are in each state (published per domain), and
        each checkpoint's state and verdict (checkpoint, state, what ``check`` answers)."""
        self.disk_states.set_checkpoints(domain, disk, states, verdicts)

    def forget_disk(self, domain: str, disk: str) -> None:
        self.disk_states.forget_disk(domain, disk)

    def forget_domain(self, domain: str) -> None:
        self.disk_states.forget_domain(domain)

    def set_disks_in_error(self, kinds: Mapping[str, int]) -> None:
        """How many disks are in error now, per kind; kinds seen before and gone go to 0."""
        self._error_kinds.update(kinds)
        for kind in self._error_kinds:
            self.disks_in_error.labels(kind).set(kinds.get(kind, 0))

    def serve(self, host: str, port: int) -> None:
        start_http_server(port, addr=host or "0.0.0.0", registry=self.registry)  # noqa: S104
