"""What a look means for the world outside it: log lines, the state of each checkpoint to
remember, the counts for the metrics.  Pure: values in, values out; ``apply`` carries them out.

Tested by tables, like the planner.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import BitsUnrecoverable
from ..fingerprints import Fingerprint
from ..gate import verdict_of
from ..health import CheckpointHealth, State
from ..look.decide import keeps_old_chain
from ..look.findings import NO_SUCH_DISK, CommitReport, LookResult

__all__ = [
    "LogLine",
    "chain_line",
    "checkpoint_counts",
    "checkpoint_verdicts",
    "commit_line",
    "deferred_line",
    "drops_record",
    "fingerprint_to_keep",
    "health_lines",
    "health_memory",
    "saves_record",
    "skip_line",
    "unverified_commit_line",
]


@dataclass(frozen=True, slots=True)
class LogLine:
    level: str
    event: str
    fields: Mapping[str, Any]


def saves_record(result: LookResult) -> bool:
    """Whether the state directory is to keep what the look saw: not when it failed, and not
    while a commit whose failure may pass is to be tried again on the old chain."""
    return (
        result.skipped is None
        and result.error is None
        and bool(result.chain)
        and not keeps_old_chain(result.commits)
    )


def fingerprint_to_keep(result: LookResult) -> Fingerprint | None:
    """What a rescan may compare the disk with instead of reading it.  None for a running disk
    with bitmaps the daemon distrusts: a monitor command (``block-dirty-bitmap-enable``) can make
    one record again and leave no trace in its file or XML, so each rescan reads them (and
    quarantines them again)."""
    return None if result.running and result.distrust else result.fingerprint


def drops_record(result: LookResult) -> bool:
    """Whether the disk is gone from the domain (its record goes)."""
    return result.skipped == NO_SUCH_DISK


def skip_line(reason: str, *, expected: bool) -> LogLine:
    """``disk_skipped``: info for a disk that holds no checkpoints by its nature (raw, network,
    block), a warning for one that should have been looked at (outside the storage roots)."""
    return LogLine("info" if expected else "warning", "disk_skipped", {"reason": reason})


def commit_line(report: CommitReport, trigger: str, job_type: str | None) -> LogLine:
    """The ``reconciliation`` line of one commit: info when it ended well, a warning when it
    was skipped, an error otherwise."""
    fields: dict[str, Any] = {
        "trigger": trigger,
        "job_type": job_type or ("live" if report.live else "offline"),
        "top": report.commit.top,
        "base": report.commit.base,
        "removed": list(report.commit.removed),
        "result": report.label,
        "found_by": "files" if report.commit.hidden else "chain",
        "duration": round(report.duration, 3),
    }
    if report.note:
        fields["reason"] = report.note
    if report.plan is not None:
        fields["bitmaps"] = [merge.bitmap for merge in report.plan.merges]
        fields["skipped"] = [f"{s.bitmap}: {s.reason.value}" for s in report.plan.skipped]
    if report.error is None:
        return LogLine("info", "reconciliation", fields)
    fields["error"] = str(report.error)
    fields["error_kind"] = report.error.kind
    if isinstance(report.error, BitsUnrecoverable):
        fields["untrusted"] = list(report.error.bitmaps)
        if report.plan is None:
            fields["bitmaps"] = list(report.error.bitmaps)
    elif report.at_risk:
        fields["untrusted"] = list(report.at_risk)
    # Skipped, or a chain that may have been reverted on purpose: a warning (the checkpoints'
    # state says what the next backup does); anything else needs an administrator.
    level = "warning" if report.label in ("skipped", "unproven") else "error"
    return LogLine(level, "reconciliation", fields)


def deferred_line(report: CommitReport, trigger: str, *, attempt: int, retry_in: float) -> LogLine:
    """A commit whose failure may pass, to be tried again."""
    return LogLine(
        "warning",
        "reconciliation_deferred",
        {
            "trigger": trigger,
            "top": report.commit.top,
            "base": report.commit.base,
            "error": str(report.error),
            "error_kind": report.error.kind if report.error else None,
            "attempt": attempt,
            "retry_in": retry_in,
        },
    )


def unverified_commit_line(
    report: LookResult, trigger: str, job_type: str | None, *, completed: bool, just_handled: bool
) -> LogLine | None:
    """A COMPLETED commit event whose look found no known layer gone: the layers were made and
    committed away between two looks.  libvirt merged their bitmaps itself, but nothing here
    saw them, so nothing could be verified; said as a skipped reconciliation.  Not when the look
    begun at READY has handled the commit already (``just_handled``), nor at first sight."""
    if (
        not completed
        or job_type not in ("commit", "active_commit")
        or report.commits
        or report.first_sight
        or just_handled
    ):
        return None
    return LogLine(
        "warning",
        "reconciliation",
        {
            "trigger": trigger,
            "job_type": job_type,
            "result": "skipped",
            "reason": "no layer known to virt-bitmapd left the chain; the committed layers "
            "were made after its last look, so the commit was not verified",
            "chain": list(report.chain),
            "previous": list(report.previous_chain),
        },
    )


def chain_line(report: LookResult, trigger: str, *, saved: bool) -> LogLine | None:
    """``disk_tracked`` at first sight; ``chain_changed`` when the chain moved and the new one
    was saved (not when a commit is to be tried again on the old one)."""
    if report.first_sight:
        fields = {"chain": list(report.chain), "running": report.running, "trigger": trigger}
        return LogLine("info", "disk_tracked", fields)
    if report.chain != report.previous_chain and saved:
        return LogLine(
            "info",
            "chain_changed",
            {
                "chain": list(report.chain),
                "previous": list(report.previous_chain),
                "trigger": trigger,
            },
        )
    return None


def checkpoint_counts(health: Sequence[CheckpointHealth]) -> dict[str, int]:
    """Per state (the ``virt_bitmapd_checkpoints`` labels), how many checkpoints of a disk (and
    bitmaps no checkpoint names) are in it."""
    counts = {state.value: 0 for state in State}
    for entry in health:
        counts[entry.state.value] += 1
    return counts


def checkpoint_verdicts(health: Sequence[CheckpointHealth]) -> tuple[tuple[str, str, int], ...]:
    """Each checkpoint's (name, state, what ``check`` answers): the per-checkpoint series.
    Bitmaps no checkpoint names are left out (counted in ``virt_bitmapd_checkpoints``)."""
    return tuple(
        (entry.checkpoint, entry.state.value, int(verdict_of(entry)))
        for entry in health
        if entry.checkpoint is not None
    )


def _health_key(entry: CheckpointHealth) -> str:
    return entry.checkpoint or f"bitmap:{entry.bitmap}"


def health_lines(
    before: Mapping[str, str] | None, health: Sequence[CheckpointHealth]
) -> list[LogLine]:
    """A ``checkpoint_health`` line for each checkpoint whose state changed since the last look
    (``before``: key -> state value; None at first sight, when only the unusable are told):
    a warning when a backup from it is refused or would miss data, info otherwise.  Nothing
    while a block job runs (busy): its state is told when the job has ended, if it changed."""
    lines = []
    for entry in health:
        if entry.state is State.BUSY:
            continue
        old = None if before is None else before.get(_health_key(entry))
        if old == entry.state.value or (before is None and entry.state is State.USABLE):
            continue
        if entry.state is State.ORPHAN and before is None:
            continue
        fields: dict[str, Any] = {
            "checkpoint": entry.checkpoint,
            "bitmap": entry.bitmap,
            "state": entry.state.value,
            "next_backup": entry.next_backup.value,
            "offline_backup": entry.offline.value,
        }
        if old is not None:
            fields["previous_state"] = old
        if entry.reason:
            fields["reason"] = entry.reason
        if entry.layer:
            fields["layer"] = entry.layer
        bad = entry.state in (State.BROKEN, State.UNTRUSTED, State.MISSING)
        lines.append(LogLine("warning" if bad else "info", "checkpoint_health", fields))
    return lines


def health_memory(
    before: Mapping[str, str] | None, health: Sequence[CheckpointHealth]
) -> dict[str, str]:
    """What ``health_lines`` compares the next look with: each state, but a busy checkpoint's
    last state before the job (so the job's end tells only a real change)."""
    memory = {}
    for entry in health:
        key = _health_key(entry)
        if entry.state is not State.BUSY:
            memory[key] = entry.state.value
        elif before is not None and key in before:
            memory[key] = before[key]
    return memory
