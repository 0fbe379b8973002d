"""Rescans: which disks to look at when nothing announced a change.

A full rescan (startup, every reconnect, SIGHUP) asks for a look at every disk of every domain.
The periodic one looks only at the disks something says changed since their last complete
look: a shut-off domain costs a stat per layer (its XML changes only with a lifecycle event,
which asks for looks itself); a running one also its XML and its checkpoint list (a snapshot or
a checkpoint changes no layer's stat until QEMU writes it out).  That is how commits done
outside libvirt that the directory watch missed are found.

A known domain libvirt does not list any more is a transient domain that stopped (oVirt runs
its VMs so, and cold-merges while they are down), or one undefined while nobody listened: its
chains are kept for ``RETENTION``, so that a commit made meanwhile is found when it comes back.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Mapping, Sequence, Set
from typing import Any

import libvirt
import structlog

from ..domain_xml import SkippedDisk
from ..errors import VirtBitmapdError
from ..fingerprints import Fingerprint, stat_layers, unchanged
from ..readers.chain import domain_disks, resolved
from ..readers.checkpoints import checkpoint_names
from ..retention import RETENTION
from ..state import StateStore
from .apply import Applier
from .disk_memory import DiskKey, DiskMemory
from .heap import give_back_memory
from .scheduler import LookRequest, Scheduler
from .tasks import TaskSupervisor

__all__ = ["Rescans", "changed_targets", "disk_targets"]

log = structlog.get_logger()


def disk_targets(
    domain: libvirt.virDomain, store: StateStore
) -> tuple[tuple[str, ...], tuple[SkippedDisk, ...]]:
    """Every file-backed qcow2 disk target the domain has now, plus those known from before
    (to forget them); and the disks left alone, with the reason (raw disks, which hold no
    checkpoints and are never opened; network and block devices)."""
    disks = domain_disks(domain)
    known = store.load(domain.UUIDString())
    names = [disk.target for disk in disks.disks]
    names += [t for t in (known.chains if known else {}) if t not in names]
    return tuple(names), disks.skipped


def changed_targets(
    domain: libvirt.virDomain, disks: Mapping[str, Fingerprint | None], running: bool
) -> tuple[str, ...] | None:
    """The disk targets something says changed since their last complete look (``disks``:
    target -> what it saw, None: it proved nothing); None when a disk came or went."""
    chains: dict[str, tuple[str, ...]] | None = None
    names = None
    if running:
        chains = {disk.target: resolved(disk).paths for disk in domain_disks(domain).disks}
        if set(chains) != set(disks):
            return None
        names = checkpoint_names(domain)
    return tuple(
        target
        for target, fingerprint in disks.items()
        if fingerprint is None
        or not unchanged(
            fingerprint,
            chain=None if chains is None else chains[target],
            checkpoints=names,
            stats=stat_layers(fingerprint.chain),
        )
    )


class Rescans:
    def __init__(
        self,
        store: StateStore,
        memory: DiskMemory,
        scheduler: Scheduler,
        applier: Applier,
        tasks: TaskSupervisor,
        *,
        connection: Callable[[], libvirt.virConnect | None],
        count_unread: Callable[[int], None],
    ) -> None:
        self._store = store
        self._memory = memory
        self._scheduler = scheduler
        self._applier = applier
        self._tasks = tasks
        self._connection = connection
        self._count_unread = count_unread

    async def all(self, trigger: str, *, only_changed: bool = False) -> None:
        """``only_changed``: look only at the disks something says changed (the periodic
        rescan); else at every disk."""
        conn = self._connection()
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
            plan, unread = await asyncio.to_thread(self._changed_disks, domains, active)
            self._count_unread(unread)
            for dom, changed in plan:
                if changed is None:
                    disks += len(await self.domain(dom, trigger))
                else:
                    disks += len(changed)
                    for target in changed:
                        self._scheduler.submit(
                            (dom.UUIDString(), target), LookRequest.because(trigger)
                        )
        else:
            for dom in domains:
                disks += len(await self.domain(dom, trigger))
        for uuid in self._store.known():
            if uuid not in present:
                self._absent(uuid)
        log.debug("rescan_done", trigger=trigger, domains=len(domains), unread_disks=unread)
        if not only_changed:
            self._tasks.spawn("rescan", self._finished(trigger, started, len(domains), disks))

    def _changed_disks(
        self, domains: Sequence[libvirt.virDomain], running: Set[str]
    ) -> tuple[list[tuple[libvirt.virDomain, tuple[str, ...] | None]], int]:
        """Per domain, the disk targets to look at (None: all of them); and how many disks
        are left unread."""
        known: dict[str, dict[str, Fingerprint | None]] = {}
        for uuid, target in self._memory.chains:
            known.setdefault(uuid, {})[target] = self._memory.fingerprints.get((uuid, target))
        plan: list[tuple[libvirt.virDomain, tuple[str, ...] | None]] = []
        unread = 0
        for domain in domains:
            uuid = domain.UUIDString()
            disks = known.get(uuid, {})
            changed = None
            if disks:
                with contextlib.suppress(VirtBitmapdError):  # the look says what is wrong
                    changed = changed_targets(domain, disks, uuid in running)
            if changed is not None and len(changed) < len(disks):
                unread += len(disks) - len(changed)
                with contextlib.suppress(VirtBitmapdError):
                    self._store.touch(uuid)  # seen: its chains are kept while it is listed
            plan.append((domain, changed))
        return plan, unread

    async def _finished(self, trigger: str, started: float, domains: int, disks: int) -> None:
        """Say when every look a full rescan asked for has been taken (how long a startup
        takes on this host)."""
        await self._scheduler.drain()
        give_back_memory()
        seconds = round(time.monotonic() - started, 3)
        log.info("rescan_finished", trigger=trigger, domains=domains, disks=disks, seconds=seconds)

    async def domain(self, dom: Any, trigger: str) -> list[DiskKey]:
        """Ask for a look at each of the domain's disks; their keys."""
        try:
            targets, skipped = await asyncio.to_thread(disk_targets, dom, self._store)
        except VirtBitmapdError as error:
            log.warning("domain_unreadable", domain=dom.name(), error=str(error))
            return []
        uuid = dom.UUIDString()
        self._memory.absent_logged.discard(uuid)
        self._applier.disks_skipped(uuid, dom.name(), skipped)
        keys = [(uuid, target) for target in targets]
        for key in keys:
            self._scheduler.submit(key, LookRequest.because(trigger))
        return keys

    def _absent(self, uuid: str) -> None:
        """A known domain libvirt does not list: its metrics and memory go now, its chains
        after RETENTION."""
        try:
            known = self._store.load(uuid)
            age = self._store.age(uuid)
        except VirtBitmapdError:
            known, age = None, None
        name = known.name if known else uuid
        if known is None or age is None or age > RETENTION:
            self.forget(uuid, name, "absent")
            return
        logged = uuid in self._memory.absent_logged
        self._applier.forget_domain(uuid, name)
        self._memory.absent_logged.add(uuid)
        if not logged:
            log.info("domain_absent", domain=name, chains_kept_for_days=RETENTION // 86400)

    def forget(self, uuid: str, name: str, reason: str) -> None:
        self._applier.forget_domain(uuid, name)
        try:
            self._store.forget(uuid)
        except VirtBitmapdError as error:
            log.error("state_unusable", domain=name, error=str(error))
            return
        log.info("domain_forgotten", domain=name, reason=reason)
