"""Carry out what a look means: logs, metrics, retries, the per-disk memory.

The decisions are pure (``reports``, ``disk_memory``); this applies them.  A look that failed
before any commit could be judged is counted every time but logged once per change of its error;
a commit whose failure may pass is tried again with growing delays and counted as failed only
when the tries run out.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import structlog

from ..errors import ToolCrashed, VirtBitmapdError
from ..observability.metrics import Metrics
from .disk_memory import DiskKey, DiskMemory, commit_retry_delay, look_retry_delay
from .reports import (
    NO_SUCH_DISK,
    DiskReport,
    LogLine,
    chain_line,
    checkpoint_counts,
    commit_line,
    deferred_line,
    health_lines,
    health_memory,
    unverified_commit_line,
)

__all__ = ["JOB_WINDOW", "Reporter"]

log = structlog.get_logger()

UNREADABLE = "!unreadable"  # the key of a disk's checkpoint memory when they could not be read

# A commit a look at a running disk found at most this many seconds before a COMPLETED event,
# and that no such event claimed yet, belongs to that event.
JOB_WINDOW = 60.0


class Reporter:
    def __init__(
        self,
        metrics: Metrics,
        memory: DiskMemory,
        *,
        submit: Callable[[DiskKey, str], object],
        generation: Callable[[str], int],
        rescan_interval: float,
    ) -> None:
        """``submit(key, trigger)`` asks for another look; ``generation(uuid)`` is the state
        store's generation of a domain now."""
        self._metrics = metrics
        self._memory = memory
        self._submit = submit
        self._generation = generation
        self._rescan_interval = rescan_interval

    def disk_failed(self, key: DiskKey, domain: str, error: VirtBitmapdError, trigger: str) -> None:
        """A look failed before any commit could be judged: counted every time, logged once per
        change of the error, looked at again later when it may pass."""
        self._metrics.disk_errors.labels(error.kind).inc()
        self._count_crash(error)
        changed = self._memory.record_error(key, error.kind, str(error))
        self.publish_errors()
        bound = log.bind(domain=domain, disk=key[1], error=str(error), error_kind=error.kind)
        if error.retryable:  # e.g. QEMU still closing the images: look again soon
            delay = look_retry_delay(self._memory.look_delays.get(key), self._rescan_interval)
            self._memory.look_delays[key] = delay
            (bound.warning if changed else bound.debug)("disk_check_deferred", retry_in=delay)
            asyncio.get_running_loop().call_later(delay, self._submit, key, trigger)
        else:
            (bound.error if changed else bound.debug)("disk_check_failed")

    def publish_errors(self) -> None:
        self._metrics.set_disks_in_error(self._memory.errors_by_kind())

    def publish(
        self, report: DiskReport, trigger: str, job_type: str | None, *, completed: bool = False
    ) -> None:
        """Carry out what a look means.  ``job_type``: the block job an event announced;
        ``completed``: that it ended."""
        bound = log.bind(domain=report.domain, disk=report.disk)
        key = (report.uuid, report.disk)
        if report.skipped is not None:
            if key not in self._memory.skip_logged and report.skipped != NO_SUCH_DISK:
                self._memory.skip_logged.add(key)
                bound.warning("disk_skipped", reason=report.skipped)
                self._metrics.reconciliations.labels(trigger, "skipped").inc()
            self._metrics.forget_disk(report.domain, report.disk)
            return
        if report.error is not None:
            self.disk_failed(key, report.domain, report.error, trigger)
            return
        self._memory.skip_logged.discard(key)
        self._memory.look_delays.pop(key, None)
        ended = self._memory.clear_error(key)
        if ended is not None:
            self.publish_errors()
            bound.info("disk_check_recovered", previous_error=ended[1])
        retried = self._publish_commits(bound, key, report, trigger, job_type)
        unverified = unverified_commit_line(
            report,
            trigger,
            job_type,
            completed=completed,
            just_handled=self._claim(key, report, completed=completed),
        )
        if unverified is not None:
            self._metrics.reconciliations.labels(trigger, "skipped").inc()
            _emit(bound, unverified)
        if report.generation != self._generation(report.uuid):
            return  # the domain was undefined while it was looked at: nothing left to track
        line = chain_line(report, trigger, saved=not retried)
        if line is not None:
            _emit(bound, line)
        self._metrics.set_disk_bitmaps(
            report.domain, report.disk, report.bitmap_states, len(report.untrusted)
        )
        self._publish_checkpoints(bound, key, report)

    def _publish_checkpoints(self, bound: Any, key: DiskKey, report: DiskReport) -> None:
        """Quarantines done or failed, then each checkpoint whose state changed."""
        if report.quarantined:
            self._metrics.quarantines.labels("disabled").inc(len(report.quarantined))
            bound.warning(
                "checkpoint_quarantined",
                bitmaps=sorted(report.quarantined),
                reasons=dict(report.quarantined),
                effect="libvirt refuses incremental backups from these checkpoints; the next "
                "backup of each must be full; deleting the checkpoint ends the quarantine",
            )
        if report.quarantine_error is not None:
            self._metrics.quarantines.labels("failed").inc()
            bound.error(
                "quarantine_failed",
                error=str(report.quarantine_error),
                error_kind=report.quarantine_error.kind,
            )
        if report.healed:
            self._metrics.heals.labels("healed").inc(len(report.healed))
            bound.info(
                "checkpoint_healed",
                bitmaps=sorted({step.bitmap for step in report.healed}),
                images=sorted({step.image for step in report.healed}),
                how="each copy rebuilt from its overlay's allocated clusters (a superset of "
                "what was written there since the checkpoint)",
            )
        if report.heal_error is not None:
            self._metrics.heals.labels("failed").inc()
            bound.error(
                "heal_failed", error=str(report.heal_error), error_kind=report.heal_error.kind
            )
        if report.checkpoint_error is not None:  # told once per change, judged again next look
            said = {UNREADABLE: str(report.checkpoint_error)}
            if self._memory.checkpoint_states.get(key) != said:
                bound.error("checkpoints_unreadable", error=said[UNREADABLE])
            self._memory.checkpoint_states[key] = said
            return
        for line in health_lines(self._memory.checkpoint_states.get(key), report.health):
            _emit(bound, line)
        self._memory.checkpoint_states[key] = health_memory(report.health)
        self._metrics.set_disk_checkpoints(
            report.domain, report.disk, checkpoint_counts(report.health)
        )

    def _claim(self, key: DiskKey, report: DiskReport, *, completed: bool) -> bool:
        """Whether a COMPLETED event's commit was handled by an earlier look (the look at READY
        may see the pivot done), claiming it so that no later event can: each commit event gets
        exactly one reconciliation line.  Looks at a running disk that find commits outside a
        COMPLETED event leave them to be claimed."""
        now = time.monotonic()
        if not completed:
            if report.commits and report.running:
                self._memory.unclaimed_commits[key] = now
            return False
        found = self._memory.unclaimed_commits.pop(key, None)
        return found is not None and now - found < JOB_WINDOW

    def _count_crash(self, error: VirtBitmapdError | None) -> None:
        if _crashed(error):
            self._metrics.tool_crashes.inc()

    def _publish_commits(
        self, bound: Any, key: DiskKey, report: DiskReport, trigger: str, job_type: str | None
    ) -> bool:
        """Report each commit; True when some will be tried again (their chain was not saved).

        A failure that may pass (an image briefly held by another process) is retried with a
        growing delay and counted as failed only when the tries run out."""
        retry = [c for c in report.commits if c.error is not None and c.error.retryable]
        failures = self._memory.commit_failures.get(key, 0) + 1 if retry else 0
        delay = commit_retry_delay(failures) if retry else None
        if delay is None:
            self._memory.commit_failures.pop(key, None)
        else:
            self._memory.commit_failures[key] = failures
            asyncio.get_running_loop().call_later(delay, self._submit, key, trigger)
        for commit in report.commits:
            if delay is not None and commit in retry:
                _emit(bound, deferred_line(commit, trigger, attempt=failures, retry_in=delay))
                continue
            outcome = commit.outcome
            self._count_crash(commit.error)
            self._metrics.record(
                trigger=trigger,
                result=commit.label,
                duration=commit.duration,
                added=sum(1 for m in outcome.merges if m.created) if outcome else 0,
                merged=len(outcome.merges) if outcome else 0,
            )
            _emit(bound, commit_line(commit, trigger, job_type))
        return bool(retry)


def _crashed(error: BaseException | None) -> bool:
    """Whether a tool's crash is behind ``error`` (itself, or its cause)."""
    while error is not None:
        if isinstance(error, ToolCrashed):
            return True
        error = error.__cause__
    return False


def _emit(bound: Any, line: LogLine) -> None:
    getattr(bound, line.level)(line.event, **line.fields)
