"""Prometheus metrics, prefixed ``virt_bitmapd_``, in a registry of their own."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.exposition import start_http_server

from .. import __version__

__all__ = ["BITMAP_STATES", "CHECKPOINT_STATES", "RESULTS", "TRIGGERS", "Metrics"]

TRIGGERS = ("event", "watch", "rescan", "startup", "manual")
RESULTS = (
    "reconciled",
    "already_consistent",
    "nothing_to_do",
    "unrecoverable",
    "failed",
    "skipped",
)
BITMAP_STATES = ("valid", "disabled", "inconsistent", "broken_chain")
CHECKPOINT_STATES = ("usable", "broken", "untrusted", "missing", "orphan_bitmap")
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
        self.bitmaps = Gauge(
            "virt_bitmapd_bitmaps",
            "Checkpoint bitmaps on the host's disks at the last scan, by state",
            ["state"],
            registry=r,
        )
        self.untrusted = Gauge(
            "virt_bitmapd_untrusted_bitmaps",
            "Bitmaps of a domain that cannot be trusted: its next backup must be full",
            ["domain"],
            registry=r,
        )
        self.checkpoints = Gauge(
            "virt_bitmapd_checkpoints",
            "A domain's checkpoints, one per disk each, by state at the last look: usable, "
            "broken (libvirt refuses a backup from it), untrusted (may miss data, or "
            "quarantined), missing (no bitmap); and bitmaps no checkpoint names (orphan_bitmap)",
            ["domain", "state"],
            registry=r,
        )
        self.quarantines = Counter(
            "virt_bitmapd_quarantines_total",
            "Untrusted bitmaps disabled so that libvirt refuses backups from them (disabled), "
            "and attempts that failed (failed)",
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
            "Temporary QEMU nodes and probe bitmaps of an earlier run removed, by kind",
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
        for state in BITMAP_STATES:
            self.bitmaps.labels(state).set(0)
        for result in ("disabled", "failed"):
            self.quarantines.labels(result)
        for result in ("healed", "failed"):
            self.heals.labels(result)
        self.libvirt_connected.set(0)
        self._bitmaps_by_disk: dict[tuple[str, str], Mapping[str, int]] = {}
        self._untrusted_by_disk: dict[tuple[str, str], int] = {}
        self._checkpoints_by_disk: dict[tuple[str, str], Mapping[str, int]] = {}
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
        self._bitmaps_by_disk[(domain, disk)] = dict(states)
        self._untrusted_by_disk[(domain, disk)] = untrusted
        self._publish(domain)

    def set_disk_checkpoints(self, domain: str, disk: str, states: Mapping[str, int]) -> None:
        """How many of one disk's checkpoints are in each state; published per domain."""
        self._checkpoints_by_disk[(domain, disk)] = dict(states)
        self._publish(domain)

    def forget_disk(self, domain: str, disk: str) -> None:
        self._bitmaps_by_disk.pop((domain, disk), None)
        self._untrusted_by_disk.pop((domain, disk), None)
        self._checkpoints_by_disk.pop((domain, disk), None)
        self._publish(domain)

    def forget_domain(self, domain: str) -> None:
        keys = set(self._bitmaps_by_disk) | set(self._checkpoints_by_disk)
        for key in [key for key in keys if key[0] == domain]:
            self._bitmaps_by_disk.pop(key, None)
            self._untrusted_by_disk.pop(key, None)
            self._checkpoints_by_disk.pop(key, None)
        self._publish(domain)

    def _publish(self, domain: str) -> None:
        for state in BITMAP_STATES:
            self.bitmaps.labels(state).set(
                sum(states.get(state, 0) for states in self._bitmaps_by_disk.values())
            )
        disks = [states for (d, _), states in self._checkpoints_by_disk.items() if d == domain]
        for state in CHECKPOINT_STATES:
            count = sum(s.get(state, 0) for s in disks)
            if count:
                self.checkpoints.labels(domain, state).set(count)
            else:  # a series per domain and state would cost memory on hosts of many domains
                with contextlib.suppress(KeyError):  # never published
                    self.checkpoints.remove(domain, state)
        per_domain = [n for (d, _), n in self._untrusted_by_disk.items() if d == domain]
        if per_domain:
            self.untrusted.labels(domain).set(sum(per_domain))
        else:
            with contextlib.suppress(KeyError):  # never published
                self.untrusted.remove(domain)

    def set_disks_in_error(self, kinds: Mapping[str, int]) -> None:
        """How many disks are in error now, per kind; kinds seen before and gone go to 0."""
        self._error_kinds.update(kinds)
        for kind in self._error_kinds:
            self.disks_in_error.labels(kind).set(kinds.get(kind, 0))

    def serve(self, host: str, port: int) -> None:
        start_http_server(port, addr=host or "0.0.0.0", registry=self.registry)  # noqa: S104
