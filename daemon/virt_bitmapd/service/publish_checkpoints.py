"""A look's news about checkpoints, told: quarantines and heals done or failed, then each
checkpoint whose state changed (logs and metrics).  What to say is decided in ``effects``."""

from __future__ import annotations

from typing import Any

from ..look.findings import LookResult
from ..observability.metrics import Metrics
from .disk_memory import DiskKey, DiskMemory
from .effects import LogLine, checkpoint_counts, health_lines, health_memory

__all__ = ["emit", "publish_checkpoints"]

UNREADABLE = "!unreadable"  # the key of a disk's checkpoint memory when they could not be read


def publish_checkpoints(
    metrics: Metrics, memory: DiskMemory, bound: Any, key: DiskKey, report: LookResult
) -> None:
    """Quarantines done or failed, then each checkpoint whose state changed."""
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
    metrics.set_disk_checkpoints(report.domain, report.disk, checkpoint_counts(report.health))


def emit(bound: Any, line: LogLine) -> None:
    getattr(bound, line.level)(line.event, **line.fields)
