"""Finding what libvirt announces with no event: snapshots, and files changed beside the chains.

* Names changed in the watched directories (``LayerWatch``): a shut-off disk whose layers they
  are is looked at (unless every layer's stat is still what its last look saw: the daemon's own
  write, a base it just reconciled, is no news).  A running disk whose layers they are has its
  XML compared a few times: a snapshot reopens the old top read-only (a close after writing),
  and its file appears before libvirt switches the domain onto it.  Other names wake nothing.
* The safety net: every snapshot watch interval, running domains with bitmaps whose chains lie
  in directories the watch does not cover have their XML compared with their known chains.
* The watched directories follow the chains the looks saw.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Mapping

import libvirt
import structlog

from ..errors import LibvirtFailed, VirtBitmapdError
from ..observability.metrics import Metrics
from ..readers.chain import domain_disks, resolved
from ..tracking import grew_on_top
from .disk_memory import DiskKey, DiskMemory
from .layer_watch import Changes, LayerWatch, layer_directories
from .scheduler import LookRequest
from .tasks import TaskSupervisor

__all__ = ["ChainWatch", "disks_touched", "grown_chains", "may_be_own_write"]

log = structlog.get_logger()

#: After files changed beside running domains' layers, their XML is compared this many seconds
#: apart: a snapshot's file appears before libvirt has switched the domain onto it.
GROWTH_CHECKS = (0.0, 0.3, 1.0, 2.5)
WATCH_REFRESH = 0.5  # seconds: the watched directories follow the chains at most this often


def disks_touched(chains: Mapping[DiskKey, tuple[str, ...]], changes: Changes) -> list[DiskKey]:
    """The disks some of whose layers are among ``changes`` (a name, or "" for the directory
    itself)."""
    return [
        key
        for key, chain in chains.items()
        if any(
            {"", os.path.basename(path)} & changes.get(os.path.dirname(path), set())
            for path in chain
        )
    ]


def may_be_own_write(request: LookRequest, running: bool | None) -> bool:
    """Whether a look asked for may be the daemon's own write coming back, to be spared when
    every layer is as the last look left it: a file watch's request alone, for a disk last seen
    shut off.  A running disk's news is its XML (a snapshot reopens the old top read-only and
    may leave every stat as it was), which a stat cannot tell."""
    return request.reasons == ("watch",) and running is False


def grown_chains(
    conn: libvirt.virConnect, known: Mapping[str, Mapping[str, tuple[str, ...]]]
) -> list[DiskKey]:
    """(domain UUID, disk target) of running disks whose chain gained layers on top since the
    last look.  ``known``: domain UUID -> disk target -> chain at the last look, for the
    domains to compare (others are not read).  Only the domain XML is read."""
    grown = []
    try:
        running = conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)
    except libvirt.libvirtError as error:
        raise LibvirtFailed(f"cannot list the running domains: {error}") from error
    for domain in running:
        chains = known.get(domain.UUIDString())
        if not chains:
            continue
        try:
            disks = domain_disks(domain)
        except LibvirtFailed:
            continue  # stopped or undefined meanwhile: its lifecycle event covers it
        for disk in disks.disks:
            old = chains.get(disk.target)
            if old is not None and grew_on_top(old, resolved(disk).paths):
                grown.append((domain.UUIDString(), disk.target))
    return grown


class ChainWatch:
    def __init__(
        self,
        memory: DiskMemory,
        metrics: Metrics,
        tasks: TaskSupervisor,
        *,
        storage_roots: tuple[str, ...],
        enabled: bool,
        submit: Callable[[DiskKey, LookRequest], object],
        connection: Callable[[], libvirt.virConnect | None],
    ) -> None:
        self._memory = memory
        self._metrics = metrics
        self._tasks = tasks
        self._roots = storage_roots
        self._enabled = enabled
        self._submit = submit
        self._connection = connection
        self._watch = LayerWatch(self._files_changed)
        self._refresh_handle: asyncio.TimerHandle | None = None

    def start(self) -> None:
        if self._enabled and self._watch.start():
            self._refresh()

    def close(self) -> None:
        if self._refresh_handle is not None:
            self._refresh_handle.cancel()
        self._watch.close()

    def chains_changed(self, directories: set[str]) -> None:
        """A look saw a chain change: a directory not watched yet is watched at once (changes
        before are not seen), else the watched set follows soon."""
        if self._enabled and directories - self._watch.directories:
            self._refresh()
        elif self._refresh_handle is None:
            loop = asyncio.get_running_loop()
            self._refresh_handle = loop.call_later(WATCH_REFRESH, self._refresh)

    def _refresh(self) -> None:
        if self._refresh_handle is not None:
            self._refresh_handle.cancel()
            self._refresh_handle = None
        before = self._watch.directories
        self._watch.watch(layer_directories(self._memory.chains.values(), self._roots))
        now = self._watch.directories
        if now != before:
            self._metrics.watched_directories.set(len(now))
            log.debug("watch_changed", added=sorted(now - before), removed=sorted(before - now))

    def _files_changed(self, changes: Changes) -> None:
        running: set[DiskKey] = set()
        for key in disks_touched(self._memory.chains, changes):
            if self._memory.running.get(key):
                running.add(key)
            else:
                self._submit(key, LookRequest.because("watch"))
        if running:
            self._tasks.spawn("watch", self._look_for_growth(running))

    async def _look_for_growth(self, keys: set[DiskKey]) -> None:
        """Compare the XML of these running disks a few times over a few seconds, until each
        has grown or the time is up."""
        for delay in GROWTH_CHECKS:
            await asyncio.sleep(delay)
            for key in await self._grown(keys):
                keys.discard(key)
                self._submit(key, LookRequest.because("watch"))
            if not keys:
                return

    async def watch_for_snapshots(self) -> None:
        """The safety net for snapshots the directory watch cannot see (a chain in a directory
        the watch could not be set on, or --no-watch).  Nothing at all is read when no such
        domain runs."""
        keys = {
            key
            for key in self._memory.with_bitmaps
            if self._memory.running.get(key) and not self._watched(key)
        }
        for key in await self._grown(keys):
            self._submit(key, LookRequest.because("rescan"))

    def _watched(self, key: DiskKey) -> bool:
        """Whether every directory of the disk's chain is watched: then a snapshot is seen
        there (its old top is reopened read-only by QEMU: a close after writing)."""
        chain = self._memory.chains.get(key, ())
        return bool(chain) and {os.path.dirname(p) for p in chain} <= self._watch.directories

    async def _grown(self, keys: set[DiskKey]) -> list[DiskKey]:
        """Which of these running disks' chains gained layers on top, from their XML."""
        conn = self._connection()
        if conn is None or not keys:
            return []
        known: dict[str, dict[str, tuple[str, ...]]] = {}
        for uuid, target in keys:
            if (uuid, target) in self._memory.chains:
                known.setdefault(uuid, {})[target] = self._memory.chains[(uuid, target)]
        try:
            return await asyncio.to_thread(grown_chains, conn, known)
        except VirtBitmapdError as error:  # the connection's own handling reports it
            log.debug("snapshot_watch_failed", error=str(error))
            return []
