"""The pre-backup gate: may a backup tool take an incremental backup from a checkpoint now?
Pure: no I/O.

The answer follows the monitoring-plugin convention (Nagios, Icinga, NRPE), so a backup job and
a monitoring system can run the same command:

* 0, incremental: complete for libvirt's backup API and for an offline single-copy export
  (``qemu-nbd --bitmap``) alike, on every disk the checkpoint covers;
* 1, full: libvirt refuses it (broken, quarantined, missing), or qemu-nbd does, or there is no
  such checkpoint: take a full backup.  The gate refuses what libvirt refuses for every reader,
  so a quarantined checkpoint, whose disabled copy qemu-nbd would still export short, is 1;
* 2, misses data: libvirt or an offline export would take it and miss data (untrusted under a
  report-only policy, a top copy short of the chain's): take a full backup, and find out why;
* 3, unknown: it cannot be judged now (a block job runs, a disk or the daemon's memory cannot be
  read).

Disks are judged one by one and the worst answer wins, worst first: misses data, unknown, full.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .health import CheckpointHealth, NextBackup, State
from .offline_export import OfflineExport

if TYPE_CHECKING:  # a plain value; status itself reads libvirt
    from .status import DomainStatus

__all__ = ["DiskAnswer", "GateAnswer", "Verdict", "gate", "verdict_of"]


class Verdict(enum.IntEnum):
    """The exit status of ``virt-bitmapd check``."""

    INCREMENTAL = 0
    FULL = 1
    MISSES_DATA = 2
    UNKNOWN = 3

    @property
    def label(self) -> str:
        """The monitoring plugin's word for it."""
        return ("OK", "WARNING", "CRITICAL", "UNKNOWN")[self]

    @property
    def advice(self) -> str:
        return (
            "an incremental backup from it is complete",
            "take a full backup",
            "an incremental backup from it would miss data: take a full backup",
            "cannot be judged now",
        )[self]


#: worst first: the first of these any disk has is the answer
SEVERITY = (Verdict.MISSES_DATA, Verdict.UNKNOWN, Verdict.FULL, Verdict.INCREMENTAL)


@dataclass(frozen=True, slots=True, kw_only=True)
class DiskAnswer:
    #: the disk's target (``name`` in libvirt's checkpoint XML)
    name: str
    verdict: Verdict
    reason: str
    bitmap: str | None = None
    state: str | None = None
    #: what libvirt's backup API does with it, and what an offline export does
    backup: str | None = None
    offline_export: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class GateAnswer:
    domain: str
    checkpoint: str | None
    verdict: Verdict
    reason: str
    disks: tuple[DiskAnswer, ...] = ()


def _judge_health(entry: CheckpointHealth) -> tuple[Verdict, str]:
    readers = (
        ("libvirt's backup", entry.next_backup.value),
        ("offline export", entry.offline.value),
    )
    said = "; ".join(f"{who}: {what}" for who, what in readers)
    why = f"{said} ({entry.reason})" if entry.reason else said
    if entry.offline_reason and entry.offline_reason != entry.reason:
        why += f" (offline: {entry.offline_reason})"
    busy = entry.next_backup is NextBackup.AFTER_JOB or entry.offline is OfflineExport.AFTER_JOB
    if entry.state is State.BUSY or busy:
        return Verdict.UNKNOWN, f"a block job runs on the disk; {why}"
    if entry.next_backup is NextBackup.MISSES_DATA:
        return Verdict.MISSES_DATA, why
    if entry.next_backup not in (NextBackup.SAFE, NextBackup.WHOLE_DISK):
        # libvirt refuses it (broken, quarantined, missing): so does the gate, for every
        # reader, an offline export that would take a disabled copy included
        return Verdict.FULL, why
    if entry.offline is OfflineExport.MISSES_DATA:
        return Verdict.MISSES_DATA, why
    if entry.offline not in (OfflineExport.SAFE, OfflineExport.WHOLE_DISK):
        return Verdict.FULL, why
    return Verdict.INCREMENTAL, why


def verdict_of(entry: CheckpointHealth) -> Verdict:
    """What ``check`` answers for one checkpoint on one disk."""
    return _judge_health(entry)[0]


def _disk_answer(entry: CheckpointHealth) -> DiskAnswer:
    verdict, why = _judge_health(entry)
    return DiskAnswer(
        name=entry.disk,
        verdict=verdict,
        reason=why,
        bitmap=entry.bitmap,
        state=entry.state.value,
        backup=entry.next_backup.value,
        offline_export=entry.offline.value,
    )


def _not_judged(
    domain: DomainStatus, checkpoint: str | None, disk: str | None, memory_error: str | None
) -> tuple[Verdict, str] | None:
    """Why the checkpoint cannot be judged at all, or is not there; None when it can be."""
    if domain.error:
        return Verdict.UNKNOWN, f"the domain cannot be read: {domain.error}"
    if memory_error:
        return Verdict.UNKNOWN, f"virt-bitmapd's memory: {memory_error}"
    if disk is not None and all(d.disk != disk for d in domain.disks):
        skipped = dict(domain.skipped)
        why = f"holds no checkpoints: {skipped[disk]}" if disk in skipped else "no such disk"
        return Verdict.UNKNOWN, f"{disk}: {why}"
    if checkpoint is not None and checkpoint not in domain.checkpoints:
        return Verdict.FULL, f"the domain has no checkpoint {checkpoint!r}"
    return None


def _disk_answers(domain: DomainStatus, checkpoint: str, disk: str | None) -> list[DiskAnswer]:
    answers = []
    for status in domain.disks:
        if disk is not None and status.disk != disk:
            continue
        if status.error:
            reason = f"cannot be read: {status.error}"
            answers.append(DiskAnswer(name=status.disk, verdict=Verdict.UNKNOWN, reason=reason))
            continue
        entry = next((e for e in status.checkpoints if e.checkpoint == checkpoint), None)
        if entry is not None:  # else the checkpoint leaves the disk out
            answers.append(_disk_answer(entry))
    return answers


def gate(
    domain: DomainStatus,
    checkpoint: str | None = None,
    *,
    disk: str | None = None,
    memory_error: str | None = None,
) -> GateAnswer:
    """Judge ``checkpoint`` of ``domain`` (None: its latest, the one an incremental backup is
    taken from by default) on every disk it covers, or on ``disk`` only.  ``memory_error``: why
    the daemon's memory of untrusted bitmaps could not be read (nothing is complete then)."""
    if checkpoint is None and domain.checkpoints:
        checkpoint = domain.checkpoints[-1]

    def answer(verdict: Verdict, reason: str, disks: tuple[DiskAnswer, ...] = ()) -> GateAnswer:
        return GateAnswer(
            domain=domain.name, checkpoint=checkpoint, verdict=verdict, reason=reason, disks=disks
        )

    early = _not_judged(domain, checkpoint, disk, memory_error)
    if early is not None:
        return answer(*early)
    if checkpoint is None:
        return answer(Verdict.FULL, "the domain has no checkpoint")
    answers = _disk_answers(domain, checkpoint, disk)
    if not answers:
        where = f"disk {disk}" if disk is not None else "any disk"
        reason = f"checkpoint {checkpoint!r} covers no bitmap of {where}"
        return answer(Verdict.FULL, reason)
    worst = next(v for v in SEVERITY if any(a.verdict is v for a in answers))
    first = next(a for a in answers if a.verdict is worst)
    return answer(worst, f"{first.name}: {first.reason}", tuple(answers))
