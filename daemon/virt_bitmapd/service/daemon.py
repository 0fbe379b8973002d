"""`virt-bitmapd run`: the asyncio service, wiring sources, the scheduler, looks and the writer.

libvirt's events arrive on libvirt's own event thread and are handed to the loop
(``libvirt_events``); blocking work (libvirt calls, QEMU tools) runs in worker threads.  The loop
only routes.  Sources ask for looks with a ``LookRequest`` carrying their reasons:

* libvirt's events (``EventIntake``): block jobs and lifecycle changes;
* the directory watch and the snapshot safety net (``ChainWatch``);
* rescans at startup, after every reconnect, on SIGHUP and periodically (``Rescans``);
* ``virt-bitmapd check``, through the control socket (``ControlServer``), which is answered
  once the looks it asked for have ended.

The scheduler runs one look per disk at a time, coalescing requests.  A look (``look.run``) is
gather, decide, act, reread, judge; what it found goes through ``effects`` (pure) to ``apply``,
the one writer.  Background work is supervised (``TaskSupervisor``): an exception is logged,
counted, and the work goes on.  SIGTERM stops taking work, lets running looks finish, and exits
within 10 s.
"""

from __future__ import annotations

import asyncio
import signal

import libvirt
import structlog

from ..block_jobs import LAYERS_CARRIED
from ..config import Settings, parse_listen
from ..control_client import LookFailed
from ..errors import LibvirtFailed, VirtBitmapdError
from ..fingerprints import left_as_they_were
from ..handover import Handover
from ..look.run import Look
from ..observability.metrics import Metrics
from ..observability.sdnotify import Notifier
from ..readers.qemu_log import log_dir_for
from ..state import StateStore
from ..transports import children
from .apply import Applier
from .chain_watch import ChainWatch, may_be_own_write
from .connection import BACKOFF_MAX, Connection, EventHandlers
from .control import ControlServer
from .disk_memory import DiskKey, DiskMemory
from .event_intake import EventIntake
from .leftovers import remove_leftovers
from .libvirt_events import LibvirtEventThread, route_libvirt_errors
from .rescans import Rescans
from .scheduler import LookRequest, Scheduler
from .tasks import TaskSupervisor

__all__ = ["Daemon"]

log = structlog.get_logger()

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
        self.look = Look(
            self.store,
            settings.storage_roots,
            Handover(settings.state_dir),
            untrusted_policy=settings.untrusted_policy,
            heal=settings.heal,
            log_dir=log_dir_for(settings.uri),
        )
        self._memory = DiskMemory()
        self._stopping = asyncio.Event()
        self._scheduler = Scheduler(self._look_at_disk, settings.concurrency)
        self._tasks = TaskSupervisor(self._background_failed)
        self._intake = EventIntake(
            self.metrics,
            look=self._scheduler.submit,
            forget=lambda uuid, name: self._rescans.forget(uuid, name, "undefined"),
            rescan=lambda dom: self._tasks.spawn("rescan_domain", self._rescan_domain(dom)),
        )
        self._connection = Connection(
            settings.uri,
            EventHandlers(block_job=self._intake.block_job, lifecycle=self._intake.lifecycle),
            metrics=self.metrics,
            notifier=self.notifier,
            backoff_max=backoff_max,
        )
        self._watch = ChainWatch(
            self._memory,
            self.metrics,
            self._tasks,
            storage_roots=settings.storage_roots,
            enabled=settings.watch,
            submit=self._scheduler.submit,
            connection=lambda: self._connection.conn,
        )
        self.applier = Applier(
            self.metrics,
            self._memory,
            self.store,
            submit=self._scheduler.submit,
            chains_changed=self._watch.chains_changed,
            rescan_interval=settings.rescan_interval,
        )
        self._rescans = Rescans(
            self.store,
            self._memory,
            self._scheduler,
            self.applier,
            self._tasks,
            connection=lambda: self._connection.conn,
            count_unread=self.metrics.rescan_unread.inc,
        )
        self._control = ControlServer(settings.control_socket, self._look_now)

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
        if self.settings.control_socket:
            await self._control.start()
        await self._end_leftover_tools()
        self._watch.start()
        log.info(
            "daemon_started",
            uri=self.settings.uri,
            storage_roots=list(self.settings.storage_roots),
            state_dir=self.settings.state_dir,
            metrics=self.settings.metrics_listen or "off",
        )
        settings = self.settings
        self._tasks.every(
            "rescan",
            lambda: settings.rescan_interval,
            lambda: self._rescans.all("rescan", only_changed=True),
        )
        if settings.snapshot_watch_interval:
            interval = settings.snapshot_watch_interval
            self._tasks.every("snapshot_watch", lambda: interval, self._watch.watch_for_snapshots)
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
            await self._control.close()
            self._watch.close()
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
        self._tasks.spawn("rescan", self._rescans.all(trigger))

    def _serve_metrics(self) -> None:
        if not self.settings.metrics_listen:
            return
        host, port = parse_listen(self.settings.metrics_listen)
        try:
            self.metrics.serve(host, port)
        except OSError as error:  # keeping bitmaps whole matters more than being watched
            log.error("metrics_unavailable", listen=self.settings.metrics_listen, error=str(error))

    async def _end_leftover_tools(self) -> None:
        """Tools a killed predecessor left running (they may hold images a domain needs)."""
        records = children.record_in(self.settings.state_dir)
        try:
            ended = await asyncio.to_thread(records.end_leftovers)
        except OSError as error:
            log.error("state_unusable", path=str(records.directory), error=str(error))
            return
        if ended:
            self.metrics.leftovers_removed.labels("process").inc(len(ended))
            log.warning(
                "leftovers_removed",
                processes=[f"{leftover.tool} (pid {leftover.pid})" for leftover in ended],
            )

    async def _on_connected(self, conn: libvirt.virConnect, first: bool) -> None:
        for removed in await asyncio.to_thread(remove_leftovers, conn):
            self.metrics.leftovers_removed.labels("job").inc(len(removed.jobs))
            self.metrics.leftovers_removed.labels("node").inc(len(removed.nodes))
            self.metrics.leftovers_removed.labels("bitmap").inc(len(removed.bitmaps))
            log.warning(
                "leftovers_removed",
                domain=removed.domain,
                jobs=list(removed.jobs),
                nodes=list(removed.nodes),
                bitmaps=list(removed.bitmaps),
                failures=list(removed.failures),
            )
        await self._rescans.all("startup" if first else "rescan")

    async def _rescan_domain(self, dom: libvirt.virDomain) -> None:
        await self._rescans.domain(dom, "rescan")

    async def _look_now(self, name: str, timeout: float) -> list[str]:
        """Look at each disk of domain ``name`` now (``check``); the targets, once every look
        asked for until now has ended."""
        conn = self._connection.conn
        if conn is None:
            raise LookFailed("libvirt is not connected")
        try:
            dom = await asyncio.to_thread(conn.lookupByName, name)
        except libvirt.libvirtError as error:
            raise LookFailed(f"{name}: {error}") from error
        keys = await self._rescans.domain(dom, "check")
        try:
            async with asyncio.timeout(timeout):
                for key in keys:
                    await self._scheduler.settled(key)
        except TimeoutError:
            raise LookFailed(f"{name}: the look did not end within {timeout:g} s") from None
        return [target for _uuid, target in keys]

    def _background_failed(self, task: str) -> None:
        self.metrics.background_errors.labels(task).inc()

    def _state_quarantined(self, path: str, why: str) -> None:
        self.metrics.disk_errors.labels("state_corrupt").inc()
        log.error("state_quarantined", path=path, error=why)

    async def _ping_watchdog(self) -> None:
        self.notifier.watchdog()

    # ------------------------------------------------------------------ one look

    async def _look_at_disk(self, key: DiskKey, request: LookRequest) -> None:
        uuid, target = key
        conn = self._connection.conn
        if conn is None:
            return  # everything is looked at again after the reconnect
        if may_be_own_write(request, self._memory.running.get(key)) and await asyncio.to_thread(
            left_as_they_were, self._memory.left_stats.get(key, {})
        ):  # every layer as the last look left it: the daemon's own write, no news
            log.debug("look_spared", domain=uuid, disk=target, reasons=list(request.reasons))
            return
        job = request.job
        try:
            dom = await asyncio.to_thread(conn.lookupByUUIDString, uuid)
            result = await asyncio.to_thread(
                self.look,
                dom,
                target,
                copied=job is not None and job.type == "copy" and job.completed,
                job_done=job is not None and job.type in LAYERS_CARRIED and job.completed,
                trust_last_look=request.trigger == "startup",
            )
        except libvirt.libvirtError as error:
            if error.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return  # undefined meanwhile: the lifecycle event forgets it
            self.applier.disk_failed(key, uuid, LibvirtFailed(str(error)), request)
            return
        except VirtBitmapdError as error:  # libvirtd gone, ...
            self.applier.disk_failed(key, uuid, error, request)
            return
        await self.applier.look_done(result, request)
