"""The series that describe each disk's bitmaps and checkpoints, computed when scraped.

A host may have hundreds of domains; a labelled gauge child per domain (and per domain and
state) costs about a kilobyte each in prometheus_client, and re-summing every disk at each update
makes a startup quadratic. Instead each disk's last counts are kept as one small, shared tuple and
the families are built from them at scrape time, from the HTTP server's thread (hence the lock).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["BITMAP_STATES", "CHECKPOINT_STATES", "DiskStates"]

BITMAP_STATES = ("valid", "disabled", "inconsistent", "broken_chain")
CHECKPOINT_STATES = ("usable", "broken", "untrusted", "missing", "orphan_bitmap", "busy")

BITMAPS = "virt_bitmapd_bitmaps"
BITMAPS_HELP = "Checkpoint bitmaps on the host's disks at the last scan, by state"
UNTRUSTED = "virt_bitmapd_untrusted_bitmaps"
UNTRUSTED_HELP = "Bitmaps of a domain that cannot be trusted: its next backup must be full"
CHECKPOINTS = "virt_bitmapd_checkpoints"
VERDICT = "virt_bitmapd_checkpoint_verdict"
VERDICT_HELP = (
    "Each checkpoint of each disk at the last look, with its state: what 'virt-bitmapd check' "
    "answers for it: 0 an incremental backup from it is complete (libvirt's backup and an "
    "offline qemu-nbd export), 1 take a full backup (refused), 2 an incremental would miss "
    "data, 3 unknown (a block job runs)"
)
CHECKPOINTS_HELP = (
    "A domain's checkpoints, one per disk each, by state at the last look: usable, broken "
    "(libvirt refuses a backup from it), untrusted (may miss data, or quarantined), missing "
    "(no bitmap); and bitmaps no checkpoint names (orphan_bitmap)"
)

Counts = tuple[int, ...]
#: (checkpoint, state, verdict) of each checkpoint of a disk
Verdicts = tuple[tuple[str, str, int], ...]
SHARED_MAX = 4096


class _Disk:
    __slots__ = ("bitmaps", "checkpoints", "untrusted", "verdicts")

    def __init__(self) -> None:
        self.bitmaps: Counts | None = None  # BITMAP_STATES order; None: never looked at
        self.untrusted = 0
        self.checkpoints: Counts | None = None  # CHECKPOINT_STATES order
        self.verdicts: Verdicts = ()


class DiskStates(Collector):
    """``virt_bitmapd_bitmaps{state}`` (the host's totals, every state always present),
    ``virt_bitmapd_untrusted_bitmaps{domain}`` (each domain whose bitmaps were counted) and
    ``virt_bitmapd_checkpoints{domain,state}`` (non-zero states only) and
    ``virt_bitmapd_checkpoint_verdict{domain,disk,checkpoint,state}`` (one series per checkpoint
    that exists: their number is bounded by the checkpoints libvirt holds)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._domains: dict[str, dict[str, _Disk]] = {}
        self._shared: dict[Counts, Counts] = {}  # most disks have the same few counts

    def set_bitmaps(
        self, domain: str, disk: str, states: Mapping[str, int], untrusted: int
    ) -> None:
        counts = self._counts(BITMAP_STATES, states)
        with self._lock:
            entry = self._domains.setdefault(domain, {}).setdefault(disk, _Disk())
            entry.bitmaps, entry.untrusted = counts, untrusted

    def set_checkpoints(
        self, domain: str, disk: str, states: Mapping[str, int], verdicts: Verdicts = ()
    ) -> None:
        counts = self._counts(CHECKPOINT_STATES, states)
        with self._lock:
            entry = self._domains.setdefault(domain, {}).setdefault(disk, _Disk())
            entry.checkpoints, entry.verdicts = counts, verdicts

    def forget_disk(self, domain: str, disk: str) -> None:
        with self._lock:
            disks = self._domains.get(domain, {})
            disks.pop(disk, None)
            if not disks:
                self._domains.pop(domain, None)

    def forget_domain(self, domain: str) -> None:
        with self._lock:
            self._domains.pop(domain, None)

    def describe(self) -> Iterator[Metric]:
        yield from _families()

    def collect(self) -> Iterator[Metric]:
        bitmaps, untrusted, checkpoints, verdicts = _families()
        totals = [0] * len(BITMAP_STATES)
        with self._lock:
            domains = [(domain, dict(disks)) for domain, disks in self._domains.items()]
        for domain, by_target in sorted(domains, key=lambda item: item[0]):
            disks = list(by_target.values())
            for target, disk in sorted(by_target.items()):
                for checkpoint, state, verdict in disk.verdicts:
                    verdicts.add_metric([domain, target, checkpoint, state], verdict)
            counted = [disk for disk in disks if disk.bitmaps is not None]
            for disk in counted:
                totals = [t + n for t, n in zip(totals, disk.bitmaps or (), strict=True)]
            if counted:
                untrusted.add_metric([domain], sum(disk.untrusted for disk in counted))
            for index, state in enumerate(CHECKPOINT_STATES):
                count = sum(disk.checkpoints[index] for disk in disks if disk.checkpoints)
                if count:  # a series per domain and state would cost every scraper memory
                    checkpoints.add_metric([domain, state], count)
        for state, total in zip(BITMAP_STATES, totals, strict=True):
            bitmaps.add_metric([state], total)
        yield from (bitmaps, untrusted, checkpoints, verdicts)

    def _counts(self, order: tuple[str, ...], states: Mapping[str, int]) -> Counts:
        counts = tuple(states.get(state, 0) for state in order)
        with self._lock:
            if len(self._shared) > SHARED_MAX:  # counts seen once long ago need not stay
                self._shared.clear()
            return self._shared.setdefault(counts, counts)


def _families() -> tuple[GaugeMetricFamily, ...]:
    return (
        GaugeMetricFamily(BITMAPS, BITMAPS_HELP, labels=["state"]),
        GaugeMetricFamily(UNTRUSTED, UNTRUSTED_HELP, labels=["domain"]),
        GaugeMetricFamily(CHECKPOINTS, CHECKPOINTS_HELP, labels=["domain", "state"]),
        GaugeMetricFamily(VERDICT, VERDICT_HELP, labels=["domain", "disk", "checkpoint", "state"]),
    )
