"""`virt-bitmapd run`: the asyncio service, wiring the connection, events, looks and reports.

libvirt's events arrive on libvirt's own event thread and are handed to the loop
(``libvirt_events``); blocking work (libvirt calls, QEMU tools) runs in worker threads.  The loop
only routes:

* libvirt's events (``EventIntake``) ask for looks at disks, or forget a domain;
* a full rescan happens at startup, after every reconnect, on SIGHUP and every rescan interval,
  which is how commits done outside libvirt (which send no event) are found;
* looks are serialized per disk and coalesced (``Scheduler``), several disks at once.

Background work is supervised (``TaskSupervisor``): an exception is logged, counted, and the work
goes on.  SIGTERM stops taking work, lets running looks finish, and exits within 10 s.
"""

from __future__ import annotations

import asyncio
import signal
from typing import Any

import libvirt
import structlog

from ..config import Settings, parse_listen
from ..errors import LibvirtFailed, VirtBitmapdError
from ..handover import Handover
from ..observability.metrics import Metrics
from ..observability.sdnotify import Notifier
from ..state import StateStore
from .connection import BACKOFF_MAX, Connection, EventHandlers
from .disk_check import DiskChecker
from .disk_memory import DiskKey, DiskMemory
from .event_intake import EventIntake
from .leftovers import remove_leftovers
from .libvirt_events import LibvirtEventThread, route_libvirt_errors
from .reporting import Reporter
from .scheduler import Scheduler
from .tasks import TaskSupervisor

__all__ = ["Daemon"]

log = structlog.get_logger()

# How long the chains of a domain libvirt no longer lists are kept (seconds).
ABSENT_RETENTION = 90 * 86400
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
        self.checker = DiskChecker(
            self.store,
            settings.storage_roots,
            Handover(settings.state_dir),
            untrusted_policy=settings.untrusted_policy,
            heal=settings.heal,
        )
        self._memory = DiskMemory()
        self._intake = EventIntake(
            self.metrics,
            self._memory,
            look=lambda key: self._scheduler.submit(key, "event"),
            forget=lambda uuid, name: self._forget(uuid, name, "undefined"),
            rescan=lambda dom: self._tasks.spawn(
                "rescan_domain", self._rescan_domain(dom, "rescan")
            ),
        )
        self._connection = Connection(
            settings.uri,
            EventHandlers(block_job=self._intake.block_job, lifecycle=self._intake.lifecycle),
            metrics=self.metrics,
            notifier=self.notifier,
            backoff_max=backoff_max,
        )
        self._stopping = asyncio.Event()
        self._scheduler = Scheduler(self._look_at_disk, settings.concurrency)
        self._tasks = TaskSupervisor(self._background_failed)
        self.reporter = Reporter(
            self.metrics,
            self._memory,
            submit=self._scheduler.submit,
            generation=self.store.generation,
            rescan_interval=settings.rescan_interval,
        )

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        route_libvirt_errors()
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
        self.reporter.publish_errors()
        if not logged:
            log.info("domain_absent", domain=name, chains_kept_for_days=ABSENT_RETENTION // 86400)

    def _forget(self, uuid: str, name: str, reason: str) -> None:
        self.metrics.forget_domain(name)
        self._memory.forget_domain(uuid)
        self.reporter.publish_errors()
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
            copied = job_type == "copy" and completed
            report = await asyncio.to_thread(self.checker.check, dom, target, copied=copied)
        except libvirt.libvirtError as error:
            if error.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return  # undefined meanwhile: the lifecycle event forgets it
            self.reporter.disk_failed(key, uuid, LibvirtFailed(str(error)), trigger)
            return
        except VirtBitmapdError as error:  # libvirtd gone, state directory unwritable, ...
            self.reporter.disk_failed(key, uuid, error, trigger)
            return
        self.reporter.publish(report, trigger, job_type, completed=completed)
