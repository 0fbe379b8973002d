"""One look at one disk of one domain: what changed since the last look, and what it needs.

Blocking code (libvirt calls, QEMU tools), run off the event loop by the daemon.  It gathers what
is there and hands it to pure code:

1. The disk's chain now (``chain_reader``): live XML and QEMU's node data when the domain runs,
   the image headers when it does not.  Paths are compared with symlinks resolved.
2. Against the chain kept in the state directory, layers that went away are commits
   (``tracking.detect_commits``).  A commit that took the known top away also takes any run of
   layers made on that top since the last look (``unseen_layers``).
3. Each commit is reconciled: live through the QEMU monitor when the domain runs, at rest with
   qemu-storage-daemon when it does not.  Committed layers already deleted make the base's bits
   unrecoverable: that is reported loudly and those bitmaps are remembered as untrusted.
4. The disk's checkpoints are judged against the chain (``health``): bitmaps whose bits cannot
   be proven complete are remembered untrusted and, by policy, quarantined (``quarantine``).
5. The new chain is saved, unless a failure that a later look may fix (a lock, libvirtd gone)
   left a commit unhandled: then the old chain stays, and the next look tries again.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from collections.abc import Mapping, Sequence, Set
from dataclasses import dataclass, replace

import libvirt

from ..checkpoint_xml import Checkpoint
from ..domain_xml import Disk, SkippedDisk
from ..errors import (
    BitsUnrecoverable,
    CommitUnverifiable,
    LibvirtFailed,
    OutsideStorageRoots,
    VirtBitmapdError,
)
from ..fingerprints import LayerStat, Seen, change_time_ns, stat_layers, unchanged
from ..handover import Handover
from ..heal import HealResult, heal_chain
from ..healing import HealPlan, HealStep, annotate, plan_healing
from ..health import (
    CheckpointHealth,
    Distrust,
    disk_health,
    lost_layers,
    to_quarantine,
    untrusted_now,
)
from ..live import reconcile_live
from ..model import QCOW2, Bitmap, Image, Reconciliation, Result
from ..quarantine import quarantine
from ..reconcile import reconcile_at_rest
from ..state import DomainState, StateStore
from ..storage_roots import require_inside
from ..tracking import Commit, copied_away, detect_commits, grew_on_top
from ..transports.libvirt_monitor import LibvirtMonitor
from .chain_reader import ChainNow, current_chain, domain_disks, resolved
from .checkpoint_reader import checkpoint_names, domain_checkpoints
from .reports import (
    NO_SUCH_DISK,
    CommitReport,
    DiskReport,
    bitmap_states,
    bitmaps_at_risk,
    untrusted_after,
)
from .unseen_layers import (
    hidden_commits_of,
    host_disks,
    overlays_beside,
    require_layers,
    with_unseen_layers,
)

__all__ = ["DiskChecker"]


@dataclass(frozen=True, slots=True, kw_only=True)
class _Judged:
    now: ChainNow
    untrusted: dict[str, Distrust]
    health: tuple[CheckpointHealth, ...]
    checkpoint_error: VirtBitmapdError | None
    quarantined: dict[str, str]
    quarantine_error: VirtBitmapdError | None
    healed: tuple[HealStep, ...]
    heal_error: VirtBitmapdError | None
    checkpoint_names: tuple[str, ...]


#: Commit results that prove the committed layers' bits reached the base.
CARRIED = (Result.RECONCILED, Result.ALREADY_CONSISTENT, Result.NOTHING_TO_DO)


class DiskChecker:
    def __init__(
        self,
        store: StateStore,
        storage_roots: Sequence[str],
        handover: Handover,
        *,
        untrusted_policy: str = "disable",
        heal: bool = False,
    ) -> None:
        self._store = store
        self._roots = tuple(storage_roots)
        self._handover = handover
        self._quarantine = untrusted_policy == "disable"
        self._heal = heal

    def targets(self, domain: libvirt.virDomain) -> tuple[tuple[str, ...], tuple[SkippedDisk, ...]]:
        """Every file-backed qcow2 disk target the domain has now, plus those known from before
        (to forget them); and the disks left alone, with the reason (raw disks, which hold no
        checkpoints and are never opened; network and block devices)."""
        disks = domain_disks(domain)
        known = self._store.load(domain.UUIDString())
        names = [disk.target for disk in disks.disks]
        names += [t for t in (known.chains if known else {}) if t not in names]
        return tuple(names), disks.skipped

    def grown_chains(
        self, conn: libvirt.virConnect, known: Mapping[str, Mapping[str, tuple[str, ...]]]
    ) -> list[tuple[str, str]]:
        """(domain UUID, disk target) of running disks whose chain gained layers on top since
        the last look: snapshots, which libvirt announces with no event.  ``known``: domain
        UUID -> disk target -> chain at the last look, for the domains to compare (others are
        not read).  Only the domain XML is read, no image and no monitor command."""
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

    def changed_disks(
        self,
        domains: Sequence[libvirt.virDomain],
        running: Set[str],
        known: Mapping[str, Mapping[str, Seen | None]],
    ) -> tuple[list[tuple[libvirt.virDomain, tuple[str, ...] | None]], int]:
        """For a periodic rescan, per domain: the disk targets something says changed since
        their last complete look, or None when nothing is known to compare with (look at them
        all); and how many disks are left unread.  ``running``: the running domains' UUIDs;
        ``known``: domain UUID -> disk target -> what its last complete look saw (None: it
        proved nothing).  A shut-off domain costs a stat per layer: its XML changes only with a
        lifecycle event, which asks for looks itself.  A running one also its XML and its
        checkpoint list: a snapshot or a checkpoint changes no layer's stat until QEMU writes
        it out."""
        plan: list[tuple[libvirt.virDomain, tuple[str, ...] | None]] = []
        unread = 0
        for domain in domains:
            uuid = domain.UUIDString()
            disks = known.get(uuid, {})
            changed = None
            if disks:
                with contextlib.suppress(VirtBitmapdError):  # the look says what is wrong
                    changed = _changed_targets(domain, disks, uuid in running)
            if changed is not None and len(changed) < len(disks):
                unread += len(disks) - len(changed)
                with contextlib.suppress(VirtBitmapdError):
                    self._store.touch(uuid)  # seen: its chains are kept while it is listed
            plan.append((domain, changed))
        return plan, unread

    def check(
        self,
        domain: libvirt.virDomain,
        target: str,
        *,
        copied: bool = False,
        trust_seen: bool = False,
    ) -> DiskReport:
        """One look.  ``copied``: a block copy of this disk just completed (its pivot replaced
        the top by a copy that holds the top's bitmaps), so the layers it replaced were not
        committed and their checkpoints live on in the new top.  ``trust_seen`` (a startup):
        a shut-off disk whose layers' stats and checkpoints are what the last look saw is not
        read again; the bitmaps that look saw stand for its images."""
        # files changed after this are news to the next look
        started_at = (started_ns := time.time_ns()) / 1e9
        try:
            uuid = domain.UUIDString()
            generation = self._store.generation(uuid)  # before anything is read
            name = domain.name()
            running = bool(domain.isActive())
        except libvirt.libvirtError as error:
            raise LibvirtFailed(f"cannot read the domain: {error}") from error
        disks = domain_disks(domain)
        state = self._store.load(uuid) or DomainState(uuid=uuid, name=name)
        base = DiskReport(
            domain=name, uuid=uuid, disk=target, running=running, generation=generation
        )
        disk = next((d for d in disks.disks if d.target == target), None)
        if disk is None:  # detached, or not a file-backed qcow2 disk any more
            self._store.drop_disk(uuid, target, generation)
            return replace(base, skipped=NO_SUCH_DISK)
        disk = resolved(disk)
        try:
            require_inside(disk.layers[0].path, self._roots)
        except OutsideStorageRoots as error:
            return replace(base, skipped=str(error))
        old = state.chains.get(target, ())
        stats_before = stat_layers({*old, *disk.paths})  # before anything is read
        seen_before = state.bitmaps.get(target, {})
        remembered = state.seen.get(target) if trust_seen and not running else None
        try:
            now, known_checkpoints = _chain_now(
                domain, disk, running, remembered=remembered, state=state, stats=stats_before
            )
        except VirtBitmapdError as error:
            return replace(base, error=error)
        last_look = state.seen_at.get(target)
        replaced = copied_away(old, now.paths) if copied else ()
        commits = tuple(
            c for c in detect_commits(old, now.paths) if not set(c.removed) <= set(replaced)
        )
        beside: dict[str, str] = {}  # recent overlays beside the chains, read once a look
        if old and old != now.paths and last_look is not None:
            try:  # maintenance between two looks may have hidden a commit
                host = functools.cache(lambda: host_disks(domain))  # only if files changed
                beside = overlays_beside(
                    now.paths, old, since=last_look, storage_roots=self._roots, host=host
                )
                if beside:
                    commits += hidden_commits_of(now.paths, beside, host())
            except VirtBitmapdError as error:
                return replace(base, error=error)
        reports = tuple(
            self._reconcile(
                domain,
                now,
                commit,
                running=running,
                seen_before=seen_before,
                old_chain=old,
                last_look=last_look,
                beside=beside,
            )
            for commit in commits
        )
        if any(r.outcome is not None and r.outcome.changed for r in reports):
            with contextlib.suppress(VirtBitmapdError):  # remember the base as changed
                now = current_chain(domain, now.disk, running)
        merged = _merged_into(state.merged_into.get(target, {}), reports, now.paths)
        judged = self._judge(
            domain,
            now,
            running,
            remembered=state.untrusted.get(target, {}),
            after_commits=untrusted_after(reports),
            merged=merged,
            copied=copied,
            known_checkpoints=known_checkpoints,
        )
        now = judged.now
        states, invalid = bitmap_states(now.images)
        clean = not (
            any(r.error is not None for r in reports)
            or judged.checkpoint_error
            or judged.quarantine_error
            or judged.heal_error
            or now.job_running
        )  # else the next rescan must read again: what failed may work then
        stats_before |= _unchanged_since(started_ns, now.paths, stats_before)
        seen = Seen.of(now.images, stats_before, judged.checkpoint_names) if clean else None
        if not any(r.error is not None and r.error.retryable for r in reports):
            self._store.put_disk(
                uuid,
                name=name,
                disk=target,
                chain=now.paths,
                untrusted=judged.untrusted,
                bitmaps=_bitmaps_to_remember(now, seen_before),
                seen_at=started_at,
                generation=generation,
                merged_into=merged,
                seen=seen,
            )
        return replace(
            base,
            chain=now.paths,
            commits=reports,
            first_sight=target not in state.chains,
            previous_chain=old,
            bitmap_states=states,
            untrusted=tuple(sorted(set(judged.untrusted) | invalid)),
            health=judged.health,
            checkpoint_error=judged.checkpoint_error,
            quarantined=judged.quarantined,
            quarantine_error=judged.quarantine_error,
            healed=judged.healed,
            heal_error=judged.heal_error,
            seen=seen,
        )

    def _judge(
        self,
        domain: libvirt.virDomain,
        now: ChainNow,
        running: bool,
        *,
        remembered: Mapping[str, Distrust],
        after_commits: Mapping[str, str],
        merged: dict[str, str],
        copied: bool = False,
        known_checkpoints: tuple[Checkpoint, ...] | None = None,
    ) -> _Judged:
        """The disk's checkpoints against its chain: what is untrusted now (``remembered``, what
        the commits of this look left, and checkpoints whose birth layer went without its bits),
        quarantined by policy, and each checkpoint's health."""
        target = now.disk.target
        try:
            checkpoints = (
                known_checkpoints if known_checkpoints is not None else domain_checkpoints(domain)
            )
            checkpoint_error = None
        except VirtBitmapdError as error:
            checkpoints, checkpoint_error = (), error
        names = _names(checkpoints)
        if copied:  # the new top holds the bitmaps of every layer the copy replaced
            merged.update(_copied_into(now.paths, checkpoints, target))
        found = dict(after_commits) | lost_layers(now.images, checkpoints, target, merged)
        untrusted = untrusted_now(remembered, found, now.images, checkpoints, target)
        quarantined: tuple[str, ...] = ()
        quarantine_error = None
        if self._quarantine and not now.job_running:  # libvirt may be handling bitmaps
            quarantined = to_quarantine(now.images, untrusted)
            try:
                quarantine(
                    now.disk,
                    quarantined,
                    running=running,
                    monitor=lambda: LibvirtMonitor(domain),
                    storage_roots=self._roots,
                )
            except VirtBitmapdError as error:
                quarantined, quarantine_error = (), error
            if quarantined or quarantine_error:
                with contextlib.suppress(VirtBitmapdError):  # remember the bitmaps disabled
                    now = current_chain(domain, now.disk, running)
        healed: tuple[HealStep, ...] = ()
        heal_error = None

        def healing_plan(chain: tuple[Image, ...]) -> HealPlan:
            return plan_healing(
                chain,
                checkpoints=checkpoints,
                target=target,
                untrusted=set(untrusted),
                merged_into=merged,
            )

        plan = healing_plan(now.images)
        if self._heal and plan.steps and not running and checkpoint_error is None:
            try:
                done = heal_chain(
                    now.paths[0],
                    storage_roots=self._roots,
                    formats=now.disk.formats,
                    checkpoints=checkpoints,
                    target=target,
                    untrusted=set(untrusted),
                    merged_into=merged,
                )
                healed = done.plan.steps if done.result is HealResult.HEALED else ()
            except VirtBitmapdError as error:
                heal_error = error
            with contextlib.suppress(VirtBitmapdError):  # remember the bitmaps healed
                now = current_chain(domain, now.disk, running)
            plan = healing_plan(now.images)
        why = {name: distrust.why for name, distrust in untrusted.items()}
        health = disk_health(now.images, checkpoints, target, why)
        return _Judged(
            now=now,
            untrusted=untrusted,
            health=() if checkpoint_error else annotate(health, plan, now.paths[0]),
            checkpoint_error=checkpoint_error,
            quarantined={name: why[name] for name in quarantined},
            quarantine_error=quarantine_error,
            healed=healed,
            heal_error=heal_error,
            checkpoint_names=names,
        )

    def _reconcile(
        self,
        domain: libvirt.virDomain,
        now: ChainNow,
        commit: Commit,
        *,
        running: bool,
        seen_before: Mapping[str, tuple[Bitmap, ...]],
        old_chain: tuple[str, ...],
        last_look: float | None,
        beside: Mapping[str, str],
    ) -> CommitReport:
        """``seen_before``: each layer's bitmaps at the previous look, before the commit;
        ``old_chain``: the chain then; ``last_look``: when that look began; ``beside``: the
        recent overlays beside the chains (``unseen_layers.overlays_beside``)."""
        remembered = seen_before.get(commit.base)
        base_before = (
            None
            if remembered is None
            else Image(path=commit.base, format=QCOW2, bitmaps=remembered)
        )
        started = time.monotonic()
        try:
            if last_look is not None and commit.top == old_chain[0]:
                commit = with_unseen_layers(
                    commit, beside=beside, seen_before=seen_before, live=running
                )
            if self._reconciled_by_command(commit):
                return CommitReport(
                    commit=commit,
                    live=running,
                    duration=time.monotonic() - started,
                    result=Result.ALREADY_CONSISTENT,
                    note="reconciled by virt-bitmapd reconcile before its layers were deleted",
                )
            require_layers(commit, seen_before, now.images)
            done = self._carry_out(domain, now.disk, commit, running, base_before)
        except VirtBitmapdError as error:
            keeps_bits = error.retryable or isinstance(error, CommitUnverifiable)
            return CommitReport(
                commit=commit,
                live=running,
                duration=time.monotonic() - started,
                error=error,
                at_risk=() if keeps_bits else bitmaps_at_risk(commit, seen_before, now.images),
            )
        return CommitReport(
            commit=commit,
            live=running,
            duration=time.monotonic() - started,
            result=done.result,
            plan=done.plan,
            outcome=done.outcome,
            error=BitsUnrecoverable(commit.base, done.why_untrusted, done.untrusted)
            if done.untrusted
            else None,
        )

    def _reconciled_by_command(self, commit: Commit) -> bool:
        gone = tuple(path for path in commit.removed if not os.path.exists(path))
        return bool(gone) and self._handover.take(commit.base, commit.removed) is not None

    def _carry_out(
        self,
        domain: libvirt.virDomain,
        disk: Disk,
        commit: Commit,
        running: bool,
        base_before: Image | None,
    ) -> Reconciliation:
        if running:
            return reconcile_live(
                LibvirtMonitor(domain),
                disk,
                commit,
                storage_roots=self._roots,
                base_before=base_before,
                domain=domain.name(),
            )
        return reconcile_at_rest(
            commit.top, commit.base, storage_roots=self._roots, base_before=base_before
        )


def _unchanged_since(
    started_ns: int, paths: Sequence[str], stats: Mapping[str, LayerStat]
) -> dict[str, LayerStat]:
    """Stats of the layers the look found on its way (not stat'ed before it read them) whose
    change time is older than the look: those are what a stat before the read would have given
    (a change time cannot be set back)."""
    found = stat_layers(path for path in paths if stats.get(path) is None)
    return {
        path: st for path, st in found.items() if st is not None and change_time_ns(st) < started_ns
    }


def _chain_now(
    domain: libvirt.virDomain,
    disk: Disk,
    running: bool,
    *,
    remembered: Seen | None,
    state: DomainState,
    stats: Mapping[str, LayerStat],
) -> tuple[ChainNow, tuple[Checkpoint, ...] | None]:
    """The disk's chain now: as ``remembered`` when nothing says it changed since ``stats``
    were taken, else read; and the domain's checkpoints when they were read to know (None:
    not read)."""
    old = state.chains.get(disk.target, ())
    checkpoints = None
    if remembered is not None and old[: len(disk.paths)] == disk.paths:
        now, checkpoints = _as_seen(domain, disk, remembered, stats, state)
        if now is not None:
            return now, checkpoints
    return current_chain(domain, disk, running), checkpoints


def _as_seen(
    domain: libvirt.virDomain,
    disk: Disk,
    seen: Seen,
    stats: Mapping[str, LayerStat],
    state: DomainState,
) -> tuple[ChainNow | None, tuple[Checkpoint, ...] | None]:
    """The chain of a shut-off disk as its last look saw it, when nothing says it changed
    since: every layer's stat and the domain's checkpoints the same (and those checkpoints,
    read to know)."""
    images = seen.images(state.bitmaps.get(disk.target, {}))
    if images is None or not unchanged(seen, chain=None, checkpoints=None, stats=stats):
        return None, None
    checkpoints = domain_checkpoints(domain)
    if _names(checkpoints) != seen.checkpoints:
        return None, checkpoints
    return ChainNow(disk=disk, paths=seen.chain, images=images), checkpoints


def _names(checkpoints: Sequence[Checkpoint]) -> tuple[str, ...]:
    """Sorted, as ``checkpoint_names`` gives them and ``Seen`` keeps them."""
    return tuple(sorted(checkpoint.name for checkpoint in checkpoints))


def _changed_targets(
    domain: libvirt.virDomain, disks: Mapping[str, Seen | None], running: bool
) -> tuple[str, ...] | None:
    chains: dict[str, tuple[str, ...]] | None = None
    names = None
    if running:
        chains = {disk.target: resolved(disk).paths for disk in domain_disks(domain).disks}
        if set(chains) != set(disks):
            return None  # a disk came or went
        names = checkpoint_names(domain)
    return tuple(
        target
        for target, seen in disks.items()
        if seen is None
        or not unchanged(
            seen,
            chain=None if chains is None else chains[target],
            checkpoints=names,
            stats=stat_layers(seen.chain),
        )
    )


def _merged_into(
    known: Mapping[str, str], reports: Sequence[CommitReport], chain: tuple[str, ...]
) -> dict[str, str]:
    """Layer -> the layer it was committed into with its bits, for commits handled well; kept
    while it leads to a layer of the chain."""
    merged = dict(known)
    for report in reports:
        if report.error is None and report.result in CARRIED:
            merged.update(dict.fromkeys(report.commit.removed, report.commit.base))

    def leads_into_chain(layer: str) -> bool:
        seen = set()
        while layer not in chain and layer in merged and layer not in seen:
            seen.add(layer)
            layer = merged[layer]
        return layer in chain

    return {layer: into for layer, into in merged.items() if leads_into_chain(into)}


def _copied_into(
    chain: tuple[str, ...], checkpoints: Sequence[Checkpoint], target: str
) -> dict[str, str]:
    """After a block copy's pivot: each checkpoint's birth layer that is not in ``chain`` any
    more -> the new top, which libvirt gave the replaced layers' bitmaps."""
    return {
        disk.chain_then[0]: chain[0]
        for checkpoint in checkpoints
        if (disk := checkpoint.disk(target)) is not None
        and disk.chain_then
        and disk.chain_then[0] not in chain
    }


def _bitmaps_to_remember(
    now: ChainNow, seen_before: Mapping[str, tuple[Bitmap, ...]]
) -> dict[str, tuple[Bitmap, ...]]:
    """Each layer's bitmaps as seen now; but the ones seen before where a block job ran while
    the chain was read (libvirt may be half-way through its own bitmap handling)."""
    return {
        image.path: seen_before[image.path]
        if now.job_running and image.path in seen_before
        else image.bitmaps
        for image in now.images
    }
