"""A look's news about checkpoints, told: fills, quarantines and heals done or failed, then each
checkpoint whose state changed (logs and metrics).  What to say is decided in ``effects``."""

from __future__ import annotations

from typing import Any

from ..look.findings import LookResult
from ..observability.metrics import Metrics
from .disk_memory import DiskKey, DiskMemory
from .effects import (
    LogLine,
    checkpoint_counts,
    checkpoint_verdicts,
    health_lines,
    health_memory,
)

__all__ = ["emit", "publish_checkpoints"]

UNREADABLE = "!unreadable"  # the key of a disk's checkpoint memory when they could not be read


def publish_checkpoints(
    metrics: Metrics, memory: DiskMemory, bound: Any, key: DiskKey, report: LookResult
) -> None:
    """Fills, quarantines and heals done or failed, then each checkpoint whose state changed."""
    if report.filled:
        metrics.fills.labels("filled").inc(len(report.filled))
        bound.warning(
            "checkpoint_filled",
            bitmaps=sorted(report.filled),
            reasons=dict(report.filled),
            image=report.chain[0],
            effect="every bit is set: the next incremental backup from each of these "
            "checkpoints, by any tool, copies the whole disk",
        )
    if report.fill_error is not None and report.filled:  # complete, a helper node left over
        bound.warning("fill_cleanup_failed", error=str(report.fill_error))
    elif report.fill_error is not None:
        metrics.fills.labels("failed").inc()
        bound.error(
            "fill_failed",
            error=str(report.fill_error),
            error_kind=report.fill_error.kind,
            effect="the bitmaps are disabled instead where they can be (libvirt refuses them; "
            "an offline export with qemu-nbd does not); the next look tries again",
        )
    if report.quarantined:
        metrics.quarantines.labels("disabled").inc(len(report.quarantined))
        bound.warning(
            "checkpoint_quarantined",
            bitmaps=sorted(report.quarantined),
            reasons=dict(report.quarantined),
            effect="libvirt refuses incremental backups from these checkpoints; the next "
            "backup of each must be full; deleting the checkpoint ends the quarantine",
        )
    if report.quarantine_error is not None:
        metrics.quarantines.labels("failed").inc()
        bound.error(
            "quarantine_failed",
            error=str(report.quarantine_error),
            error_kind=report.quarantine_error.kind,
        )
    if report.healed:
        metrics.heals.labels("healed").inc(len(report.healed))
        bound.info(
            "checkpoint_healed",
            bitmaps=sorted({step.bitmap for step in report.healed}),
            images=sorted({step.image for step in report.healed}),
            how="each copy rebuilt from its overlay's allocated clusters (a superset of "
            "what was written there since the checkpoint)",
        )
    if report.heal_error is not None:
        metrics.heals.labels("failed").inc()
        bound.error("heal_failed", error=str(report.heal_error), error_kind=report.heal_error.kind)
    if report.united:  # routine after a snapshot: each copy below merged into the top's
        bound.debug("checkpoints_united", bitmaps=list(report.united), image=report.chain[0])
    if report.union_error is not None:
        bound.warning(
            "union_failed",
            error=str(report.union_error),
            error_kind=report.union_error.kind,
            effect="an offline backup tool exporting the top's copy may miss what the layers "
            "below hold until a later look succeeds",
        )
    if report.checkpoint_error is not None:  # told once per change, judged again next look
        said = {UNREADABLE: str(report.checkpoint_error)}
        if memory.checkpoint_states.get(key) != said:
            bound.error("checkpoints_unreadable", error=said[UNREADABLE])
        memory.checkpoint_states[key] = said
        return
    before = memory.checkpoint_states.get(key)
    for line in health_lines(before, report.health):
        emit(bound, line)
    memory.checkpoint_states[key] = health_memory(before, report.health)
    metrics.set_disk_checkpoints(
        report.domain,
        report.disk,
        checkpoint_counts(report.health),
        checkpoint_verdicts(report.health),
    )


def emit(bound: Any, line: LogLine) -> None:
    getattr(bound, line.level)(line.event, **line.fields)
