"""`virt-bitmapd run`: the asyncio service, wiring the connection, events, looks and reports.

libvirt's events arrive on libvirt's own event thread and are handed to the loop
(``libvirt_events``); blocking work (libvirt calls, QEMU tools) runs in worker threads.  The loop
only routes:

* libvirt's events (``EventIntake``) ask for looks at disks, or forget a domain;
* files changing in the directories of the known layers (``LayerWatch``) ask for looks at the
  shut-off disks whose layers changed, and for a comparison of the XML of the running domains
  whose chains live there (a snapshot: libvirt sends no event for it);
* a rescan reads everything at startup, after every reconnect and on SIGHUP; every rescan
  interval it looks at the disks something says changed (``DiskChecker.needs_look``), which is
  how commits done outside libvirt that the watch missed are found; every snapshot watch
  interval, running domains with bitmaps have their XML compared (a safety net for overlays
  made in directories that are not watched);
* looks are serialized per disk and coalesced (``Scheduler``), several disks at once.

Background work is supervised (``TaskSupervisor``): an exception is logged, counted, and the work
goes on.  SIGTERM stops taking work, lets running looks finish, and exits within 10 s.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from typing import Any

import libvirt
import structlog

from ..config import Settings, parse_listen
from ..errors import LibvirtFailed, VirtBitmapdError
from ..fingerprints import Seen
from ..handover import Handover
from ..observability.metrics import Metrics
from ..observability.sdnotify import Notifier
from ..state import StateStore
from .connection import BACKOFF_MAX, Connection, EventHandlers
from .disk_check import DiskChecker
from .disk_memory import DiskKey, DiskMemory
from .event_intake import EventIntake
from .heap import give_back_memory
from .layer_watch import Changes, LayerWatch, layer_directories
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
#: After files changed beside running domains' layers, their XML is compared this many seconds
#: apart: a snapshot's file appears before libvirt has switched the domain onto it.
GROWTH_CHECKS = (0.0, 0.3, 1.0, 2.5)
WATCH_REFRESH = 0.5  # seconds: the watched directories follow the chains at most this often


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
                "rescan_domain", self._rescan_domain_now(dom, "rescan")
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
        self._watch = LayerWatch(self._files_changed)
        self._watch_refresh: asyncio.TimerHandle | None = None
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
        if self.settings.watch and self._watch.start():
            self._refresh_watch()
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
            if self._watch_refresh is not None:
                self._watch_refresh.cancel()
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
        await self._rescan_all("rescan", only_changed=True)

    async def _watch_for_snapshots(self) -> None:
        """The safety net for snapshots the directory watch cannot see (a chain in a directory
        the watch could not be set on, or --no-watch): compare the XML of those running
        domains whose chains hold bitmaps with their known chains, so a layer is known before a
        commit can take it away again.  Nothing at all is read when no such domain runs."""
        keys = {
            key
            for key in self._memory.with_bitmaps
            if self._memory.running.get(key) and not self._watched(key)
        }
        for key in await self._grown(keys):
            self._scheduler.submit(key, "rescan")

    def _watched(self, key: DiskKey) -> bool:
        """Whether every directory of the disk's chain is watched: then a snapshot is seen
        there (its old top is reopened read-only by QEMU: a close after writing)."""
        chain = self._memory.chains.get(key, ())
        return bool(chain) and {os.path.dirname(p) for p in chain} <= self._watch.directories

    async def _grown(self, keys: set[DiskKey]) -> list[DiskKey]:
        """Which of these running disks' chains gained layers on top, from their XML."""
        conn = self._connection.conn
        if conn is None or not keys:
            return []
        known: dict[str, dict[str, tuple[str, ...]]] = {}
        for uuid, target in keys:
            if (uuid, target) in self._memory.chains:
                known.setdefault(uuid, {})[target] = self._memory.chains[(uuid, target)]
        try:
            return await asyncio.to_thread(self.checker.grown_chains, conn, known)
        except VirtBitmapdError as error:  # the connection's own handling reports it
            log.debug("snapshot_watch_failed", error=str(error))
            return []

    # ------------------------------------------------------------------ the directory watch

    def _remember_look(
        self, key: DiskKey, chain: tuple[str, ...], running: bool, bitmaps: bool
    ) -> None:
        if self._memory.chains.get(key) != chain:
            self._memory.chains[key] = chain
            directories = {os.path.dirname(path) for path in chain}
            if self.settings.watch and directories - self._watch.directories:
                self._refresh_watch()  # a new directory: at once (changes before are not seen)
            else:
                self._schedule_watch_refresh()
        self._memory.running[key] = running
        if bitmaps:
            self._memory.with_bitmaps.add(key)
        else:
            self._memory.with_bitmaps.discard(key)

    def _schedule_watch_refresh(self) -> None:
        if self._watch_refresh is None:
            loop = asyncio.get_running_loop()
            self._watch_refresh = loop.call_later(WATCH_REFRESH, self._refresh_watch)

    def _refresh_watch(self) -> None:
        if self._watch_refresh is not None:
            self._watch_refresh.cancel()
            self._watch_refresh = None
        before = self._watch.directories
        self._watch.watch(
            layer_directories(self._memory.chains.values(), self.settings.storage_roots)
        )
        now = self._watch.directories
        if now != before:
            self.metrics.watched_directories.set(len(now))
            log.debug("watch_changed", added=sorted(now - before), removed=sorted(before - now))

    def _files_changed(self, changes: Changes) -> None:
        """Names changed in watched directories.  A shut-off disk whose layers they are is
        looked at.  A running disk whose layers they are has its XML compared a few times: a
        snapshot reopens the old top read-only (a close after writing there, wherever the new
        overlay is made), and its file appears before libvirt switches the domain onto it.
        Other names (a new file nobody uses yet) wake nothing: a snapshot onto it shows on its
        domain's own top."""
        running: set[DiskKey] = set()
        for key, chain in self._memory.chains.items():
            if not any(
                {"", os.path.basename(path)} & changes.get(os.path.dirname(path), set())
                for path in chain
            ):
                continue
            if self._memory.running.get(key):
                running.add(key)
            else:
                self._scheduler.submit(key, "watch")
        if running:
            self._tasks.spawn("watch", self._look_for_growth(running))

    async def _look_for_growth(self, keys: set[DiskKey]) -> None:
        """Compare the XML of these running disks a few times over a few seconds, until each
        has grown or the time is up."""
        for delay in GROWTH_CHECKS:
            await asyncio.sleep(delay)
            for key in await self._grown(keys):
                keys.discard(key)
                self._scheduler.submit(key, "watch")
            if not keys:
                return

    async def _ping_watchdog(self) -> None:
        self.notifier.watchdog()

    async def _rescan_all(self, trigger: str, *, only_changed: bool = False) -> None:
        """``only_changed``: look only at the disks something says changed (the periodic
        rescan); else at every disk."""
        conn = self._connection.conn
        if conn is None:
            return
        started = time.monotonic()
        try:
            domains = await asyncio.to_thread(conn.listAllDomains, 0)
            active = {
                dom.UUIDString()
                for dom in await asyncio.to_thread(
                    conn.listAllDomains, libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE
                )
            }
        except libvirt.libvirtError as error:
            log.error("rescan_failed", trigger=trigger, error=str(error))
            return
        present = {dom.UUIDString() for dom in domains}
        unread = disks = 0
        if only_changed:
            plan, unread = await asyncio.to_thread(
                self.checker.changed_disks, domains, active, self._known_looks()
            )
            self.metrics.rescan_unread.inc(unread)
            for dom, changed in plan:
                if changed is None:
                    disks += await self._rescan_domain(dom, trigger)
                else:
                    disks += len(changed)
                    for target in changed:
                        self._scheduler.submit((dom.UUIDString(), target), trigger)
        else:
            for dom in domains:
                disks += await self._rescan_domain(dom, trigger)
        for uuid in self.store.known():
            if uuid not in present:
                self._absent(uuid)
        log.debug("rescan_done", trigger=trigger, domains=len(domains), unread_disks=unread)
        if not only_changed:
            self._tasks.spawn(
                "rescan", self._rescan_finished(trigger, started, len(domains), disks)
            )

    async def _rescan_finished(
        self, trigger: str, started: float, domains: int, disks: int
    ) -> None:
        """Say when every look a full rescan asked for has been taken (how long a startup
        takes on this host)."""
        await self._scheduler.drain()
        give_back_memory()
        seconds = round(time.monotonic() - started, 3)
        log.info("rescan_finished", trigger=trigger, domains=domains, disks=disks, seconds=seconds)

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

    def _known_looks(self) -> dict[str, dict[str, Seen | None]]:
        """Domain UUID -> disk target -> what its last complete look saw."""
        known: dict[str, dict[str, Seen | None]] = {}
        for uuid, target in self._memory.chains:
            known.setdefault(uuid, {})[target] = self._memory.seen.get((uuid, target))
        return known

    async def _rescan_domain_now(self, dom: Any, trigger: str) -> None:
        await self._rescan_domain(dom, trigger)

    async def _rescan_domain(self, dom: Any, trigger: str) -> int:
        """Ask for a look at each of the domain's disks; how many."""
        try:
            targets, skipped = await asyncio.to_thread(self.checker.targets, dom)
        except VirtBitmapdError as error:
            log.warning("domain_unreadable", domain=dom.name(), error=str(error))
            return 0
        uuid = dom.UUIDString()
        self._memory.absent_logged.discard(uuid)
        for disk in skipped:
            if (uuid, disk.target) not in self._memory.skip_logged:
                self._memory.skip_logged.add((uuid, disk.target))
                log.info("disk_skipped", domain=dom.name(), disk=disk.target, reason=disk.reason)
        for target in targets:
            self._scheduler.submit((uuid, target), trigger)
        return len(targets)

    async def _look_at_disk(self, key: DiskKey, trigger: str) -> None:
        uuid, target = key
        job_type, completed = self._memory.job_of_event.pop(key, (None, False))
        conn = self._connection.conn
        if conn is None:
            return  # everything is looked at again after the reconnect
        try:
            dom = await asyncio.to_thread(conn.lookupByUUIDString, uuid)
            copied = job_type == "copy" and completed
            report = await asyncio.to_thread(
                self.checker.check, dom, target, copied=copied, trust_seen=trigger == "startup"
            )
        except libvirt.libvirtError as error:
            if error.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return  # undefined meanwhile: the lifecycle event forgets it
            self.reporter.disk_failed(key, uuid, LibvirtFailed(str(error)), trigger)
            return
        except VirtBitmapdError as error:  # libvirtd gone, state directory unwritable, ...
            self.reporter.disk_failed(key, uuid, error, trigger)
            return
        self.reporter.publish(report, trigger, job_type, completed=completed)
        if report.skipped is not None:
            self._memory.chains.pop(key, None)
            self._schedule_watch_refresh()
        elif report.error is None and report.chain:
            bitmaps = any(report.bitmap_states.values())
            self._remember_look(key, report.chain, report.running, bitmaps)
            self._memory.seen[key] = report.seen
        else:
            self._memory.seen.pop(key, None)  # a failed look proves nothing: read next time
