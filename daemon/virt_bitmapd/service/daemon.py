"""`virt-bitmapd run`: the asyncio service, wiring the connection, events, looks and reports.

libvirt's events arrive on libvirt's own event thread and are handed to the loop
(``libvirt_events``); blocking work (libvirt calls, QEMU tools) runs in worker threads.  The loop
only routes:

* block job events (BLOCK_JOB_2): every one is logged and counted; a COMPLETED commit or active
  commit asks for a look at that disk, an active commit's READY one that remembers its chain;
* lifecycle events ask for a look at the domain's disks (an undefined domain is forgotten);
* a full rescan happens at startup, after every reconnect, on SIGHUP and every rescan interval,
  which is how commits done outside libvirt (which send no event) are found;
* looks are serialized per disk and coalesced (``Scheduler``), several disks at once.

Background work is supervised (``TaskSupervisor``): an exception is logged, counted, and the work
goes on.  SIGTERM stops taking work, lets running looks finish, and exits within 10 s.
"""

from __future__ import annotations

import asyncio
import signal
import time
from typing import Any

import libvirt
import structlog

from ..config import Settings, parse_listen
from ..errors import LibvirtFailed, VirtBitmapdError
from ..observability.metrics import Metrics
from ..observability.sdnotify import Notifier
from ..state import StateStore
from .connection import BACKOFF_MAX, Connection, EventHandlers
from .disk_check import CommitReport, DiskChecker, DiskReport
from .disk_memory import DiskKey, DiskMemory, commit_retry_delay, look_retry_delay
from .leftovers import remove_leftovers
from .libvirt_events import LibvirtEventThread, silence_default_error_handler
from .scheduler import Scheduler
from .tasks import TaskSupervisor

__all__ = ["Daemon"]

log = structlog.get_logger()

JOB_TYPES = {
    libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_PULL: "pull",
    libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_COPY: "copy",
    libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_COMMIT: "commit",
    libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_ACTIVE_COMMIT: "active_commit",
    libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_BACKUP: "backup",
}
JOB_STATUSES = {
    libvirt.VIR_DOMAIN_BLOCK_JOB_COMPLETED: "completed",
    libvirt.VIR_DOMAIN_BLOCK_JOB_FAILED: "failed",
    libvirt.VIR_DOMAIN_BLOCK_JOB_CANCELED: "canceled",
    libvirt.VIR_DOMAIN_BLOCK_JOB_READY: "ready",
}
COMMIT_TYPES = ("commit", "active_commit")
# How long the chains of a domain libvirt no longer lists are kept (seconds).
ABSENT_RETENTION = 90 * 86400
# A commit found within this many seconds before its COMPLETED event belongs to that event.
JOB_WINDOW = 60.0
STOP_TIMEOUT = 8.0  # seconds for running looks to finish; systemd waits 10


class Daemon:
    def __init__(
        self,
        settings: Settings,
        *,
        metrics: Metrics | None = None,
        notifier: Notifier | None = None,
        backoff_max: float = BACKOFF_MAX,
    ) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.notifier = notifier or Notifier()
        self.store = StateStore(settings.state_dir, on_quarantine=self._state_quarantined)
        self.checker = DiskChecker(self.store, settings.storage_roots)
        self._connection = Connection(
            settings.uri,
            EventHandlers(block_job=self._on_block_job, lifecycle=self._on_lifecycle),
            metrics=self.metrics,
            notifier=self.notifier,
            backoff_max=backoff_max,
        )
        self._stopping = asyncio.Event()
        self._scheduler = Scheduler(self._look_at_disk, settings.concurrency)
        self._tasks = TaskSupervisor(self._background_failed)
        self._memory = DiskMemory()

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        silence_default_error_handler()
        events = LibvirtEventThread()
        events.start()  # before any connection is opened
        loop.add_signal_handler(signal.SIGTERM, self.stop)
        loop.add_signal_handler(signal.SIGINT, self.stop)
        loop.add_signal_handler(signal.SIGHUP, self.request_rescan, "manual")
        self._serve_metrics()
        log.info(
            "daemon_started",
            uri=self.settings.uri,
            storage_roots=list(self.settings.storage_roots),
            state_dir=self.settings.state_dir,
            metrics=self.settings.metrics_listen or "off",
        )
        settings = self.settings
        self._tasks.every("rescan", lambda: settings.rescan_interval, self._periodic_rescan)
        if settings.snapshot_watch_interval:
            interval = settings.snapshot_watch_interval
            self._tasks.every("snapshot_watch", lambda: interval, self._watch_for_snapshots)
        if self.notifier.watchdog_interval:
            self.notifier.watchdog()
            watchdog = self.notifier.watchdog_interval
            self._tasks.every("watchdog", lambda: watchdog, self._ping_watchdog)
        try:
            await self._connection.stay_connected(self._stopping, self._on_connected)
        finally:
            self.notifier.stopping()
            log.info("daemon_stopping")
            self._tasks.cancel_all()
            if not await self._scheduler.close(STOP_TIMEOUT):
                log.error("daemon_stop_timeout", detail="looks still running were abandoned")
            await asyncio.to_thread(self._connection.close)
            events.stop()
            log.info("daemon_stopped")
        return 0

    def stop(self) -> None:
        self._stopping.set()

    def request_rescan(self, trigger: str) -> None:
        """Look at every disk of every domain (SIGHUP: trigger "manual")."""
        log.info("rescan_requested", trigger=trigger)
        self._tasks.spawn("rescan", self._rescan_all(trigger))

    def _serve_metrics(self) -> None:
        if not self.settings.metrics_listen:
            return
        host, port = parse_listen(self.settings.metrics_listen)
        try:
            self.metrics.serve(host, port)
        except OSError as error:  # keeping bitmaps whole matters more than being watched
            log.error("metrics_unavailable", listen=self.settings.metrics_listen, error=str(error))

    async def _on_connected(self, conn: libvirt.virConnect, first: bool) -> None:
        for removed in await asyncio.to_thread(remove_leftovers, conn):
            self.metrics.leftovers_removed.labels("node").inc(len(removed.nodes))
            self.metrics.leftovers_removed.labels("bitmap").inc(len(removed.bitmaps))
            log.warning(
                "leftovers_removed",
                domain=removed.domain,
                nodes=list(removed.nodes),
                bitmaps=list(removed.bitmaps),
                failures=list(removed.failures),
            )
        await self._rescan_all("startup" if first else "rescan")

    def _background_failed(self, task: str) -> None:
        self.metrics.background_errors.labels(task).inc()

    def _state_quarantined(self, path: str, why: str) -> None:
        self.metrics.disk_errors.labels("state_corrupt").inc()
        log.error("state_quarantined", path=path, error=why)

    # ------------------------------------------------------------------ events (on the loop)

    def _on_block_job(
        self, _conn: Any, dom: Any, disk: str, job_type: int, status: int, _opaque: Any
    ) -> None:
        type_name = JOB_TYPES.get(job_type, f"unknown_{job_type}")
        status_name = JOB_STATUSES.get(status, f"unknown_{status}")
        self.metrics.block_job_events.labels(type_name, status_name).inc()
        completed = type_name in COMMIT_TYPES and status_name == "completed"
        # libvirt sends no event for a snapshot, so a layer made since the last look is unknown.
        # An active commit waits at READY with its whole chain still in place: remember it now,
        # so that such a layer is known to be part of the commit when it completes.
        ready = type_name == "active_commit" and status_name == "ready"
        log.info(
            "block_job_event",
            domain=dom.name(),
            disk=disk,
            job_type=type_name,
            status=status_name,
            action="look at the disk" if completed else "remember the chain" if ready else "none",
        )
        key = (dom.UUIDString(), disk)
        if completed or ready:  # the look at READY may already find the pivot done
            self._memory.job_of_event[key] = (type_name, completed)
            self._scheduler.submit(key, "event")

    def _on_lifecycle(self, _conn: Any, dom: Any, event: int, detail: int, _opaque: Any) -> None:
        uuid, name = dom.UUIDString(), dom.name()
        if event == libvirt.VIR_DOMAIN_EVENT_UNDEFINED:
            if detail == libvirt.VIR_DOMAIN_EVENT_UNDEFINED_RENAMED:
                # same UUID, so the known chains stay; only series under the old name go
                self.metrics.forget_domain(name)
            else:
                self._forget(uuid, name, "undefined")
            return
        # Not SHUTDOWN: QEMU still holds the images then; STOPPED follows once it has exited.
        if event in (
            libvirt.VIR_DOMAIN_EVENT_DEFINED,
            libvirt.VIR_DOMAIN_EVENT_STARTED,
            libvirt.VIR_DOMAIN_EVENT_STOPPED,
        ):
            self._tasks.spawn("rescan_domain", self._rescan_domain(dom, "rescan"))

    # ------------------------------------------------------------------ looking

    async def _periodic_rescan(self) -> None:
        await self._rescan_all("rescan")

    async def _watch_for_snapshots(self) -> None:
        """libvirt announces no snapshot: compare the running domains' XML with their known
        chains now and then, so a layer is known before a commit can take it away again."""
        conn = self._connection.conn
        if conn is None:
            return
        try:
            grown = await asyncio.to_thread(self.checker.grown_chains, conn)
        except VirtBitmapdError as error:  # the connection's own handling reports it
            log.debug("snapshot_watch_failed", error=str(error))
            return
        for key in grown:
            self._scheduler.submit(key, "rescan")

    async def _ping_watchdog(self) -> None:
        self.notifier.watchdog()

    async def _rescan_all(self, trigger: str) -> None:
        conn = self._connection.conn
        if conn is None:
            return
        try:
            domains = await asyncio.to_thread(conn.listAllDomains, 0)
        except libvirt.libvirtError as error:
            log.error("rescan_failed", trigger=trigger, error=str(error))
            return
        present = set()
        for dom in domains:
            present.add(dom.UUIDString())
            await self._rescan_domain(dom, trigger)
        for uuid in self.store.known():
            if uuid not in present:
                self._absent(uuid)

    def _absent(self, uuid: str) -> None:
        """A known domain libvirt does not list: a transient domain that stopped (oVirt runs
        its VMs so, and cold-merges while they are down), or one undefined while we were not
        listening.  Its chains are kept, so that a commit made meanwhile is found when it comes
        back; its metrics and in-memory state go now, its chains after ABSENT_RETENTION."""
        try:
            known = self.store.load(uuid)
            age = self.store.age(uuid)
        except VirtBitmapdError:
            known, age = None, None
        name = known.name if known else uuid
        if known is None or age is None or age > ABSENT_RETENTION:
            self._forget(uuid, name, "absent")
            return
        self.metrics.forget_domain(name)
        logged = uuid in self._memory.absent_logged
        self._memory.forget_domain(uuid)
        self._memory.absent_logged.add(uuid)
        self._publish_errors()
        if not logged:
            log.info("domain_absent", domain=name, chains_kept_for_days=ABSENT_RETENTION // 86400)

    def _forget(self, uuid: str, name: str, reason: str) -> None:
        self.metrics.forget_domain(name)
        self._memory.forget_domain(uuid)
        self._publish_errors()
        try:
            self.store.forget(uuid)
        except VirtBitmapdError as error:
            log.error("state_unusable", domain=name, error=str(error))
            return
        log.info("domain_forgotten", domain=name, reason=reason)

    async def _rescan_domain(self, dom: Any, trigger: str) -> None:
        try:
            targets, skipped = await asyncio.to_thread(self.checker.targets, dom)
        except VirtBitmapdError as error:
            log.warning("domain_unreadable", domain=dom.name(), error=str(error))
            return
        uuid = dom.UUIDString()
        self._memory.absent_logged.discard(uuid)
        for disk in skipped:
            if (uuid, disk.target) not in self._memory.skip_logged:
                self._memory.skip_logged.add((uuid, disk.target))
                log.info("disk_skipped", domain=dom.name(), disk=disk.target, reason=disk.reason)
        for target in targets:
            self._scheduler.submit((uuid, target), trigger)

    async def _look_at_disk(self, key: DiskKey, trigger: str) -> None:
        uuid, target = key
        job_type, completed = self._memory.job_of_event.pop(key, (None, False))
        conn = self._connection.conn
        if conn is None:
            return  # everything is looked at again after the reconnect
        try:
            dom = await asyncio.to_thread(conn.lookupByUUIDString, uuid)
            report = await asyncio.to_thread(self.checker.check, dom, target)
        except libvirt.libvirtError as error:
            if error.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return  # undefined meanwhile: the lifecycle event forgets it
            self._disk_failed(key, uuid, LibvirtFailed(str(error)), trigger)
            return
        except VirtBitmapdError as error:  # libvirtd gone, state directory unwritable, ...
            self._disk_failed(key, uuid, error, trigger)
            return
        self._publish(report, trigger, job_type, completed=completed)

    # ------------------------------------------------------------------ reporting

    def _disk_failed(
        self, key: DiskKey, domain: str, error: VirtBitmapdError, trigger: str
    ) -> None:
        """A look failed before any commit could be judged: counted every time, logged once per
        change of the error, looked at again later when it may pass."""
        self.metrics.disk_errors.labels(error.kind).inc()
        changed = self._memory.record_error(key, error.kind, str(error))
        self._publish_errors()
        bound = log.bind(domain=domain, disk=key[1], error=str(error), error_kind=error.kind)
        if error.retryable:  # e.g. QEMU still closing the images: look again soon
            delay = look_retry_delay(
                self._memory.look_delays.get(key), self.settings.rescan_interval
            )
            self._memory.look_delays[key] = delay
            (bound.warning if changed else bound.debug)("disk_check_deferred", retry_in=delay)
            asyncio.get_running_loop().call_later(delay, self._scheduler.submit, key, trigger)
        else:
            (bound.error if changed else bound.debug)("disk_check_failed")

    def _publish_errors(self) -> None:
        self.metrics.set_disks_in_error(self._memory.errors_by_kind())

    def _publish(
        self, report: DiskReport, trigger: str, job_type: str | None, *, completed: bool = False
    ) -> None:
        """``job_type``: the block job an event announced; ``completed``: that it ended."""
        bound = log.bind(domain=report.domain, disk=report.disk)
        key = (report.uuid, report.disk)
        if report.skipped is not None:
            if key not in self._memory.skip_logged and report.skipped != "no such file-backed disk":
                self._memory.skip_logged.add(key)
                bound.warning("disk_skipped", reason=report.skipped)
                self.metrics.reconciliations.labels(trigger, "skipped").inc()
            self.metrics.forget_disk(report.domain, report.disk)
            return
        if report.error is not None:
            self._disk_failed(key, report.domain, report.error, trigger)
            return
        self._memory.skip_logged.discard(key)
        self._memory.look_delays.pop(key, None)
        ended = self._memory.clear_error(key)
        if ended is not None:
            self._publish_errors()
            bound.info("disk_check_recovered", previous_error=ended[1])
        deferred = self._publish_commits(bound, key, report, trigger, job_type)
        if report.commits:
            self._memory.last_commit_seen[key] = time.monotonic()
        # A look begun at READY may already have handled the commit the COMPLETED look finds.
        last = self._memory.last_commit_seen.get(key, -1e9)
        just_handled = time.monotonic() - last < JOB_WINDOW
        if (
            completed
            and job_type in COMMIT_TYPES
            and not report.commits
            and not report.first_sight
            and not just_handled
        ):
            # Layers made and committed away between two looks: libvirt merged their bitmaps
            # itself, but nothing here saw them, so nothing could be verified.
            self.metrics.reconciliations.labels(trigger, "skipped").inc()
            bound.warning(
                "reconciliation",
                trigger=trigger,
                job_type=job_type,
                result="skipped",
                reason="no layer known to virt-bitmapd left the chain; the committed layers "
                "were made after its last look, so the commit was not verified",
                chain=list(report.chain),
                previous=list(report.previous_chain),
            )
        if report.generation != self.store.generation(report.uuid):
            return  # the domain was undefined while it was looked at: nothing left to track
        if report.first_sight:
            bound.info(
                "disk_tracked", chain=list(report.chain), running=report.running, trigger=trigger
            )
        elif report.chain != report.previous_chain and not deferred:
            bound.info(
                "chain_changed",
                chain=list(report.chain),
                previous=list(report.previous_chain),
                trigger=trigger,
            )
        self.metrics.set_disk_bitmaps(
            report.domain, report.disk, report.bitmap_states, len(report.untrusted)
        )

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
            asyncio.get_running_loop().call_later(delay, self._scheduler.submit, key, trigger)
        for commit in report.commits:
            if delay is not None and commit in retry:
                bound.warning(
                    "reconciliation_deferred",
                    trigger=trigger,
                    top=commit.commit.top,
                    base=commit.commit.base,
                    error=str(commit.error),
                    error_kind=commit.error.kind if commit.error else None,
                    attempt=failures,
                    retry_in=delay,
                )
            else:
                self._publish_commit(bound, commit, trigger, job_type)
        return bool(retry)

    def _publish_commit(
        self, bound: Any, report: CommitReport, trigger: str, job_type: str | None
    ) -> None:
        plan = report.plan
        fields: dict[str, Any] = {
            "trigger": trigger,
            "job_type": job_type or ("live" if report.live else "offline"),
            "top": report.commit.top,
            "base": report.commit.base,
            "removed": list(report.commit.removed),
            "result": report.label,
            "duration": round(report.duration, 3),
        }
        if plan is not None:
            fields["bitmaps"] = [merge.bitmap for merge in plan.merges]
            fields["skipped"] = [f"{s.bitmap}: {s.reason.value}" for s in plan.skipped]
        added = merged = 0
        if report.outcome is not None:
            added = sum(1 for m in report.outcome.merges if m.created)
            merged = len(report.outcome.merges)
        self.metrics.record(
            trigger=trigger,
            result=report.label,
            duration=report.duration,
            added=added,
            merged=merged,
        )
        if report.error is None:
            bound.info("reconciliation", **fields)
            return
        fields["error"] = str(report.error)
        fields["error_kind"] = report.error.kind
        if hasattr(report.error, "bitmaps"):
            fields["untrusted"] = list(report.error.bitmaps)
            if plan is None:
                fields["bitmaps"] = list(report.error.bitmaps)
        elif report.suspects:
            fields["untrusted"] = list(report.suspects)
        if report.label == "skipped":
            bound.warning("reconciliation", **fields)
        else:
            bound.error("reconciliation", **fields)
