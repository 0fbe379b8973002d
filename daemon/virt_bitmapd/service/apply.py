"""The one writer: what a look means, carried out in the state directory, the daemon's memory,
the logs and the metrics.

The decisions are pure (``effects``, ``disk_memory``); this applies them, in one order: the
state record first (what survives a restart), then the memory the watch and rescans compare
with, then logs and metrics.  A look that failed before any commit could be judged is counted
every time but logged once per change of its error; a commit whose failure may pass is tried
again with growing delays and counted as failed only when the tries run out.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import structlog

from ..domain_xml import SkippedDisk
from ..errors import ToolCrashed, VirtBitmapdError
from ..look.findings import NO_SUCH_DISK, LookResult
from ..observability.metrics import Metrics
from ..state import StateStore
from .disk_memory import DiskKey, DiskMemory, commit_retry_delay, look_retry_delay
from .effects import (
    chain_line,
    commit_line,
    deferred_line,
    drops_record,
    fingerprint_to_keep,
    saves_record,
    skip_line,
    unverified_commit_line,
)
from .publish_checkpoints import emit, publish_checkpoints
from .scheduler import LookRequest

__all__ = ["JOB_WINDOW", "Applier"]

log = structlog.get_logger()

# A commit a look at a running disk found at most this many seconds before a COMPLETED event,
# and that no such event claimed yet, belongs to that event.
JOB_WINDOW = 60.0


class Applier:
    def __init__(
        self,
        metrics: Metrics,
        memory: DiskMemory,
        store: StateStore,
        *,
        submit: Callable[[DiskKey, LookRequest], object],
        chains_changed: Callable[[set[str]], None],
        rescan_interval: float,
    ) -> None:
        """``submit(key, request)`` asks for another look; ``chains_changed(directories)`` is
        told when the chains the watch follows changed (with their directories)."""
        self._metrics = metrics
        self._memory = memory
        self._store = store
        self._submit = submit
        self._chains_changed = chains_changed
        self._rescan_interval = rescan_interval

    async def look_done(self, result: LookResult, request: LookRequest) -> None:
        """Carry out what one look means, the state record first (written off the loop)."""
        try:
            current = await asyncio.to_thread(self._save, result)
        except VirtBitmapdError as error:  # the state directory is unwritable
            self.disk_failed((result.uuid, result.disk), result.uuid, error, request)
            return
        self.publish(result, request, current=current)
        self._remember(result)
        log.debug(
            "look_done",
            domain=result.domain,
            disk=result.disk,
            reasons=list(request.reasons),
            stages=[*result.stages, "effects", "apply"],
        )

    def _save(self, result: LookResult) -> bool:
        """Write the disk's record; whether the domain is still the one the look began on."""
        if saves_record(result):
            return self._store.put_disk(
                result.uuid,
                name=result.domain,
                disk=result.disk,
                chain=result.chain,
                untrusted=result.distrust,
                bitmaps=result.layer_bitmaps,
                looked_at=result.started_at,
                generation=result.generation,
                merged_into=result.merged_into,
                births=result.births,
                filled=result.fills,
                united=result.united_chain,
                fingerprint=result.fingerprint,
                marks=result.marks,
            )
        if drops_record(result):
            self._store.drop_disk(result.uuid, result.disk, result.generation)
        return self._store.is_current(result.uuid, result.generation)

    def _remember(self, result: LookResult) -> None:
        """What the watch, the safety net and the rescans compare the disk with next."""
        key = (result.uuid, result.disk)
        if result.skipped is not None:
            if self._memory.chains.pop(key, None) is not None:
                self._chains_changed(set())
            return
        if result.error is not None or not result.chain:
            self._memory.fingerprints.pop(key, None)  # a failed look proves nothing: read next time
            self._memory.left_stats.pop(key, None)
            return
        if self._memory.chains.get(key) != result.chain:
            self._memory.chains[key] = result.chain
            self._chains_changed({os.path.dirname(path) for path in result.chain})
        self._memory.running[key] = result.running
        if any(result.bitmap_states.values()):
            self._memory.with_bitmaps.add(key)
        else:
            self._memory.with_bitmaps.discard(key)
        self._memory.fingerprints[key] = fingerprint_to_keep(result)
        self._memory.left_stats[key] = result.left_stats

    def disks_skipped(self, uuid: str, domain: str, skipped: Sequence[SkippedDisk]) -> None:
        """Disks a domain has that hold no checkpoints (raw, network): told once each."""
        for disk in skipped:
            key = (uuid, disk.target)
            if key not in self._memory.skip_logged:
                self._memory.skip_logged.add(key)
                emit(
                    log.bind(domain=domain, disk=disk.target), skip_line(disk.reason, expected=True)
                )

    def forget_domain(self, uuid: str, name: str) -> None:
        """Drop what the metrics and the memory hold of a domain."""
        self._metrics.forget_domain(name)
        self._memory.forget_domain(uuid)
        self.publish_errors()

    def disk_failed(
        self, key: DiskKey, domain: str, error: VirtBitmapdError, request: LookRequest
    ) -> None:
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
            retry = LookRequest.because(request.trigger)
            asyncio.get_running_loop().call_later(delay, self._submit, key, retry)
        else:
            (bound.error if changed else bound.debug)("disk_check_failed")

    def publish_errors(self) -> None:
        self._metrics.set_disks_in_error(self._memory.errors_by_kind())

    def publish(self, report: LookResult, request: LookRequest, *, current: bool = True) -> None:
        """Logs and metrics of a look.  ``current``: the domain was not forgotten meanwhile."""
        trigger = request.trigger
        job_type = request.job.type if request.job else None
        completed = request.job is not None and request.job.completed
        bound = log.bind(domain=report.domain, disk=report.disk)
        key = (report.uuid, report.disk)
        if report.skipped is not None:
            if key not in self._memory.skip_logged and report.skipped != NO_SUCH_DISK:
                self._memory.skip_logged.add(key)
                emit(bound, skip_line(report.skipped, expected=False))
                self._metrics.reconciliations.labels(trigger, "skipped").inc()
            self._metrics.forget_disk(report.domain, report.disk)
            return
        if report.error is not None:
            self.disk_failed(key, report.domain, report.error, request)
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
            emit(bound, unverified)
        if not current:
            return  # the domain was undefined while it was looked at: nothing left to track
        line = chain_line(report, trigger, saved=not retried)
        if line is not None:
            emit(bound, line)
        self._metrics.set_disk_bitmaps(
            report.domain, report.disk, report.bitmap_states, len(report.untrusted)
        )
        publish_checkpoints(self._metrics, self._memory, bound, key, report)

    def _claim(self, key: DiskKey, report: LookResult, *, completed: bool) -> bool:
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
        self, bound: Any, key: DiskKey, report: LookResult, trigger: str, job_type: str | None
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
            again = LookRequest.because(trigger)
            asyncio.get_running_loop().call_later(delay, self._submit, key, again)
        for commit in report.commits:
            if delay is not None and commit in retry:
                emit(bound, deferred_line(commit, trigger, attempt=failures, retry_in=delay))
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
            emit(bound, commit_line(commit, trigger, job_type))
        return bool(retry)


def _crashed(error: BaseException | None) -> bool:
    """Whether a tool's crash is behind ``error`` (itself, or its cause)."""
    while error is not None:
        if isinstance(error, ToolCrashed):
            return True
        error = error.__cause__
    return False
