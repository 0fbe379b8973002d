"""`virt-bitmapd run`: the asyncio service.

asyncio's standard loop drives libvirt through libvirtaio (registered before any connection is
opened).  Blocking work (libvirt calls, QEMU tools) runs in threads; the loop only routes:

* block job events (BLOCK_JOB_2): every one is logged and counted; a COMPLETED commit or active
  commit asks for a look at that disk;
* lifecycle events ask for a look at the domain's disks (an undefined domain is forgotten);
* a full rescan happens at startup, after every reconnect, on SIGHUP and every rescan interval,
  which is how commits done outside libvirt (which send no event) are found;
* looks are serialized per disk and coalesced (``Scheduler``), several disks at once.

The connection is kept alive with libvirt keepalives and a close callback; when libvirtd goes
away it is reopened with capped exponential backoff, callbacks registered again, and everything
rescanned.  SIGTERM stops taking work, lets running looks finish, and exits within 10 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from typing import Any

import libvirt
import libvirtaio
import structlog

from ..config import Settings, parse_listen
from ..errors import LibvirtFailed, VirtBitmapdError
from ..observability.metrics import Metrics
from ..observability.sdnotify import Notifier
from ..state import StateStore
from .disk_check import CommitReport, DiskChecker, DiskReport
from .scheduler import Scheduler

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
RETRY_DELAY = 5.0  # seconds before looking again at a disk whose look may succeed later
BACKOFF_START = 1.0
BACKOFF_MAX = 30.0

DiskKey = tuple[str, str]  # (domain UUID, disk target)


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
        self.store = StateStore(settings.state_dir)
        self.checker = DiskChecker(self.store, settings.storage_roots)
        self._backoff_max = backoff_max
        self._conn: libvirt.virConnect | None = None
        self._stopping = asyncio.Event()
        self._lost = asyncio.Event()
        self._scheduler = Scheduler(self._look_at_disk, settings.concurrency)
        #: the block job an event announced for a disk: its type, and whether it completed
        self._job_of_event: dict[DiskKey, tuple[str, bool]] = {}
        self._warned_skips: set[DiskKey] = set()
        self._retry_delays: dict[DiskKey, float] = {}
        self._absent_logged: set[str] = set()
        self._last_commit_seen: dict[DiskKey, float] = {}

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        libvirtaio.virEventRegisterAsyncIOImpl(loop=loop)
        loop.add_signal_handler(signal.SIGTERM, self.stop)
        loop.add_signal_handler(signal.SIGINT, self.stop)
        loop.add_signal_handler(signal.SIGHUP, self.request_rescan, "manual")
        if self.settings.metrics_listen:
            host, port = parse_listen(self.settings.metrics_listen)
            try:
                self.metrics.serve(host, port)
            except OSError as error:  # keeping bitmaps whole matters more than being watched
                log.error(
                    "metrics_unavailable", listen=self.settings.metrics_listen, error=str(error)
                )
        log.info(
            "daemon_started",
            uri=self.settings.uri,
            storage_roots=list(self.settings.storage_roots),
            state_dir=self.settings.state_dir,
            metrics=self.settings.metrics_listen or "off",
        )
        helpers = [loop.create_task(self._rescan_periodically())]
        if self.settings.snapshot_watch_interval:
            helpers.append(loop.create_task(self._watch_for_snapshots()))
        if self.notifier.watchdog_interval:
            helpers.append(loop.create_task(self._ping_watchdog(self.notifier.watchdog_interval)))
        try:
            await self._stay_connected()
        finally:
            self.notifier.stopping()
            log.info("daemon_stopping")
            for task in helpers:
                task.cancel()
            finished = await self._scheduler.close(STOP_TIMEOUT)
            if not finished:
                log.error("daemon_stop_timeout", detail="looks still running were abandoned")
            self._close_connection()
            log.info("daemon_stopped")
        return 0

    def stop(self) -> None:
        self._stopping.set()

    def request_rescan(self, trigger: str) -> None:
        """Look at every disk of every domain (SIGHUP: trigger "manual")."""
        log.info("rescan_requested", trigger=trigger)
        asyncio.get_running_loop().create_task(self._rescan_all(trigger))

    # ------------------------------------------------------------------ connection

    async def _stay_connected(self) -> None:
        delay = BACKOFF_START
        first = True
        while not self._stopping.is_set():
            try:
                conn = await asyncio.to_thread(libvirt.open, self.settings.uri)
                self._connected(conn, first)
            except libvirt.libvirtError as error:
                self._close_connection()
                self.notifier.ready(f"waiting for libvirtd at {self.settings.uri}")
                log.error(
                    "libvirt_unreachable",
                    uri=self.settings.uri,
                    error=str(error),
                    retry_in=delay,
                )
                await self._sleep_unless_stopping(delay)
                delay = min(delay * 2, self._backoff_max)
                continue
            delay = BACKOFF_START
            trigger = "startup" if first else "rescan"
            first = False
            await self._rescan_all(trigger)
            self.notifier.ready(f"connected to {self.settings.uri}")
            await self._wait_for(self._lost, self._stopping)
            if self._stopping.is_set():
                break
            self.metrics.libvirt_connected.set(0)
            self.notifier.status(f"libvirtd at {self.settings.uri} went away, reconnecting")
            log.error("libvirt_connection_lost", uri=self.settings.uri)
            self._close_connection()

    def _connected(self, conn: libvirt.virConnect, first: bool) -> None:
        """Set up a fresh connection; raises libvirtError if libvirtd refuses a step."""
        self._conn = conn  # so that a failure below still closes it
        loop = asyncio.get_running_loop()
        self._lost = asyncio.Event()
        lost = self._lost

        def on_close(_conn: Any, reason: int, _opaque: Any) -> None:
            loop.call_soon_threadsafe(lost.set)

        conn.registerCloseCallback(on_close, None)
        conn.setKeepAlive(5, 3)
        conn.domainEventRegisterAny(
            None, libvirt.VIR_DOMAIN_EVENT_ID_BLOCK_JOB_2, self._on_block_job, None
        )
        conn.domainEventRegisterAny(
            None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle, None
        )
        self.metrics.libvirt_connected.set(1)
        if not first:
            self.metrics.libvirt_reconnects.inc()
        log.info("libvirt_connected", uri=self.settings.uri, reconnect=not first)

    def _close_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        with contextlib.suppress(libvirt.libvirtError):
            conn.unregisterCloseCallback()
        with contextlib.suppress(libvirt.libvirtError):
            conn.close()

    # ------------------------------------------------------------------ events

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
            self._job_of_event[key] = (type_name, completed)
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
            asyncio.get_running_loop().create_task(self._rescan_domain(dom, "rescan"))

    # ------------------------------------------------------------------ looking

    async def _rescan_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.settings.rescan_interval)
            if self._conn is not None:
                await self._rescan_all("rescan")

    async def _watch_for_snapshots(self) -> None:
        """libvirt announces no snapshot: compare the running domains' XML with their known
        chains now and then, so a layer is known before a commit can take it away again."""
        while True:
            await asyncio.sleep(self.settings.snapshot_watch_interval)
            conn = self._conn
            if conn is None:
                continue
            try:
                grown = await asyncio.to_thread(self.checker.grown_chains, conn)
            except VirtBitmapdError as error:  # the connection's own handling reports it
                log.debug("snapshot_watch_failed", error=str(error))
                continue
            for key in grown:
                self._scheduler.submit(key, "rescan")

    async def _ping_watchdog(self, interval: float) -> None:
        while True:
            self.notifier.watchdog()
            await asyncio.sleep(interval)

    async def _rescan_all(self, trigger: str) -> None:
        conn = self._conn
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
        self._absent_logged -= present

    def _absent(self, uuid: str) -> None:
        """A known domain libvirt does not list: a transient domain that stopped (oVirt runs
        its VMs so, and cold-merges while they are down), or one undefined while we were not
        listening.  Its chains are kept, so that a commit made meanwhile is found when it comes
        back; its metrics go now, and its state after ABSENT_RETENTION without a look."""
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
        if uuid not in self._absent_logged:
            self._absent_logged.add(uuid)
            log.info("domain_absent", domain=name, chains_kept_for_days=ABSENT_RETENTION // 86400)

    def _forget(self, uuid: str, name: str, reason: str) -> None:
        self.metrics.forget_domain(name)
        try:
            self.store.forget(uuid)
        except VirtBitmapdError as error:
            log.error("state_unusable", domain=name, error=str(error))
            return
        log.info("domain_forgotten", domain=name, reason=reason)

    async def _rescan_domain(self, dom: Any, trigger: str) -> None:
        try:
            targets, unsupported = await asyncio.to_thread(self.checker.targets, dom)
        except VirtBitmapdError as error:
            log.warning("domain_unreadable", domain=dom.name(), error=str(error))
            return
        uuid = dom.UUIDString()
        for target in unsupported:
            if (uuid, target) not in self._warned_skips:
                self._warned_skips.add((uuid, target))
                log.info(
                    "disk_skipped",
                    domain=dom.name(),
                    disk=target,
                    reason="not a file-backed qcow2 chain (network or block device)",
                )
        for target in targets:
            self._scheduler.submit((uuid, target), trigger)

    async def _look_at_disk(self, key: DiskKey, trigger: str) -> None:
        uuid, target = key
        job_type, completed = self._job_of_event.pop(key, (None, False))
        conn = self._conn
        if conn is None:
            return  # everything is looked at again after the reconnect
        try:
            dom = await asyncio.to_thread(conn.lookupByUUIDString, uuid)
            report = await asyncio.to_thread(self.checker.check, dom, target)
        except libvirt.libvirtError as error:
            if error.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return  # undefined meanwhile: the lifecycle event forgets it
            self.metrics.disk_errors.labels(LibvirtFailed.kind).inc()
            log.error("disk_check_failed", domain=uuid, disk=target, error=str(error))
            return
        except VirtBitmapdError as error:  # libvirtd gone, state directory unwritable, ...
            self.metrics.disk_errors.labels(error.kind).inc()
            log.error(
                "disk_check_failed",
                domain=uuid,
                disk=target,
                error=str(error),
                error_kind=error.kind,
            )
            return
        self._publish(report, trigger, job_type, completed=completed)

    # ------------------------------------------------------------------ reporting

    def _publish(
        self, report: DiskReport, trigger: str, job_type: str | None, *, completed: bool = False
    ) -> None:
        """``job_type``: the block job an event announced; ``completed``: that it ended."""
        bound = log.bind(domain=report.domain, disk=report.disk)
        key = (report.uuid, report.disk)
        if report.skipped is not None:
            if key not in self._warned_skips and report.skipped != "no such file-backed disk":
                self._warned_skips.add(key)
                bound.warning("disk_skipped", reason=report.skipped)
                self.metrics.reconciliations.labels(trigger, "skipped").inc()
            self.metrics.forget_disk(report.domain, report.disk)
            return
        self._warned_skips.discard(key)
        if report.error is None:
            self._retry_delays.pop(key, None)
        if report.error is not None:
            self.metrics.disk_errors.labels(report.error.kind).inc()
            fields = {"error": str(report.error), "error_kind": report.error.kind}
            if report.error.retryable:  # e.g. QEMU still closing the images: look again soon
                delay = self._retry_delays.get(key, RETRY_DELAY)
                self._retry_delays[key] = min(delay * 2, self.settings.rescan_interval)
                bound.warning("disk_check_deferred", retry_in=delay, **fields)
                asyncio.get_running_loop().call_later(delay, self._scheduler.submit, key, trigger)
            else:
                bound.error("disk_check_failed", **fields)
            return
        for commit in report.commits:
            self._publish_commit(bound, commit, trigger, job_type)
        if report.commits:
            self._last_commit_seen[key] = time.monotonic()
        # A look begun at READY may already have handled the commit the COMPLETED look finds.
        just_handled = time.monotonic() - self._last_commit_seen.get(key, -1e9) < JOB_WINDOW
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
        elif report.chain != report.previous_chain:
            bound.info(
                "chain_changed",
                chain=list(report.chain),
                previous=list(report.previous_chain),
                trigger=trigger,
            )
        self.metrics.set_disk_bitmaps(
            report.domain, report.disk, report.bitmap_states, len(report.untrusted)
        )

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
            fields["bitmaps"] = list(report.error.bitmaps)
        elif report.suspects:
            fields["untrusted"] = list(report.suspects)
        if report.label == "skipped":
            bound.warning("reconciliation", **fields)
        else:
            bound.error("reconciliation", **fields)

    # ------------------------------------------------------------------ helpers

    @staticmethod
    async def _wait_for(*events: asyncio.Event) -> None:
        waiters = [asyncio.ensure_future(event.wait()) for event in events]
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()

    async def _sleep_unless_stopping(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)
