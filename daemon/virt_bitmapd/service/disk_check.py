"""One look at one disk of one domain: what changed since the last look, and what it needs.

Blocking code (libvirt calls, QEMU tools), run off the event loop by the daemon.

1. The disk's chain now: from the live domain XML when the domain runs, from the image headers
   when it does not.  Paths are compared with symlinks resolved.
2. Against the chain kept in the state directory, layers that went away are commits
   (``tracking.detect_commits``).  A commit that took the known top away also takes any run
   of layers made on that top since the last look (``_with_unseen_layers``).
3. Each commit is reconciled: live through the QEMU monitor when the domain runs, at rest with
   qemu-storage-daemon when it does not.  Committed layers already deleted make the base's bits
   unprovable: that is reported loudly and those bitmaps are remembered as untrusted.
4. The new chain is saved, unless a failure that a later look may fix (a lock, libvirtd gone)
   left the commit unhandled: then the old chain stays, and the next look tries again.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import libvirt

from .. import images
from ..domain_xml import Disk, SkippedDisk, parse_domain
from ..errors import (
    BitsUnprovable,
    ChainError,
    CommittedLayersGone,
    LayersOutOfQemuReach,
    LibvirtFailed,
    OutsideStorageRoots,
    UnseenLayersUnclear,
    VirtBitmapdError,
)
from ..live import reconcile_live
from ..model import Bitmap, Chain, Image, Outcome, Plan, Result, SkipReason
from ..planner import chain_problems
from ..qmp import node_bitmaps, query_nodes
from ..reconcile import reconcile_at_rest
from ..state import DomainState, StateStore
from ..storage_roots import require_inside
from ..tracking import Commit, detect_commits, grew_on_top, layers_above
from ..transports.libvirt_monitor import LibvirtMonitor

__all__ = ["CommitReport", "DiskChecker", "DiskReport", "result_label"]

_STATE_OF_REASON = {
    SkipReason.DISABLED: "disabled",
    SkipReason.INCONSISTENT: "inconsistent",
    SkipReason.GAP: "broken_chain",
    SkipReason.NOT_IN_TOP: "broken_chain",
    SkipReason.NOT_PERSISTENT: "broken_chain",
}


@dataclass(frozen=True, slots=True, kw_only=True)
class CommitReport:
    commit: Commit
    live: bool
    duration: float
    result: Result | None = None
    plan: Plan | None = None
    outcome: Outcome | None = None
    error: VirtBitmapdError | None = None
    #: On a failure no later look will retry: the bitmaps that may now miss the commit's bits.
    suspects: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        return result_label(self.result, self.error)


def result_label(result: Result | None, error: VirtBitmapdError | None) -> str:
    """The metric label of how a reconciliation ended."""
    if isinstance(error, BitsUnprovable):
        return "unrecoverable"
    if isinstance(error, OutsideStorageRoots | LayersOutOfQemuReach):
        return "skipped"
    if error is not None or result is None:
        return "failed"
    return result.value.replace(" ", "_")


@dataclass(frozen=True, slots=True, kw_only=True)
class DiskReport:
    domain: str
    uuid: str
    disk: str
    running: bool = False
    chain: tuple[str, ...] = ()
    commits: tuple[CommitReport, ...] = ()
    #: Why the disk was not looked at, if it was not (outside the storage roots, ...).
    skipped: str | None = None
    #: The look itself failed (chain unreadable, libvirtd gone, ...).
    error: VirtBitmapdError | None = None
    first_sight: bool = False
    previous_chain: tuple[str, ...] = ()
    bitmap_states: dict[str, int] = field(default_factory=dict)
    untrusted: tuple[str, ...] = ()
    #: The state store's generation of the domain when the look began (see StateStore).
    generation: int = 0


class DiskChecker:
    def __init__(self, store: StateStore, storage_roots: Sequence[str]) -> None:
        self._store = store
        self._roots = tuple(storage_roots)

    def targets(self, domain: libvirt.virDomain) -> tuple[tuple[str, ...], tuple[SkippedDisk, ...]]:
        """Every file-backed qcow2 disk target the domain has now, plus those known from before
        (to forget them); and the disks left alone, with the reason (raw disks, which hold no
        checkpoints and are never opened; network and block devices)."""
        try:
            disks = parse_domain(domain.XMLDesc(0))
            uuid = domain.UUIDString()
        except libvirt.libvirtError as error:
            raise LibvirtFailed(f"cannot read the domain: {error}") from error
        known = self._store.load(uuid)
        names = [disk.target for disk in disks.disks]
        names += [t for t in (known.chains if known else {}) if t not in names]
        return tuple(names), disks.skipped

    def grown_chains(self, conn: libvirt.virConnect) -> list[tuple[str, str]]:
        """(domain UUID, disk target) of running disks whose chain gained layers on top since
        the last look: snapshots, which libvirt announces with no event.  Only the domain XML
        is read, so this is cheap enough to run every few seconds."""
        grown = []
        try:
            running = conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)
        except libvirt.libvirtError as error:
            raise LibvirtFailed(f"cannot list the running domains: {error}") from error
        for domain in running:
            try:
                uuid = domain.UUIDString()
                disks = parse_domain(domain.XMLDesc(0))
            except libvirt.libvirtError:
                continue  # stopped or undefined meanwhile: its lifecycle event covers it
            known = self._store.load(uuid)
            if known is None:
                continue
            for disk in disks.disks:
                old = known.chains.get(disk.target)
                if old is not None and grew_on_top(old, _resolved(disk).paths):
                    grown.append((uuid, disk.target))
        return grown

    def check(self, domain: libvirt.virDomain, target: str) -> DiskReport:
        started_at = time.time()  # files changed after this are news to the next look
        try:
            uuid = domain.UUIDString()
            generation = self._store.generation(uuid)  # before anything is read
            name = domain.name()
            running = bool(domain.isActive())
            disks = parse_domain(domain.XMLDesc(0))
        except libvirt.libvirtError as error:
            raise LibvirtFailed(f"cannot read the domain: {error}") from error
        state = self._store.load(uuid) or DomainState(uuid=uuid, name=name)
        base = DiskReport(
            domain=name, uuid=uuid, disk=target, running=running, generation=generation
        )
        disk = next((d for d in disks.disks if d.target == target), None)
        if disk is None:  # detached, or not a file-backed qcow2 disk any more
            self._store.drop_disk(uuid, target, generation)
            return replace(base, skipped="no such file-backed disk")
        disk = _resolved(disk)
        try:
            require_inside(disk.layers[0].path, self._roots)
        except OutsideStorageRoots as error:
            return replace(base, skipped=str(error))
        try:
            disk, paths, live_images, busy = self._current_chain(domain, disk, running)
        except VirtBitmapdError as error:
            return replace(base, error=error)
        first_sight = target not in state.chains
        old = state.chains.get(target, ())
        reports = []
        seen_before = state.bitmaps.get(target, {})
        for commit in detect_commits(old, paths):
            reports.append(
                self._reconcile(
                    domain,
                    disk,
                    commit,
                    running=running,
                    seen_before=seen_before,
                    chain_now=live_images,
                    old_chain=old,
                    last_look=state.seen_at.get(target),
                )
            )
        if any(r.outcome is not None and r.outcome.changed for r in reports):
            with contextlib.suppress(VirtBitmapdError):  # remember the base as changed
                _, paths, live_images, busy = self._current_chain(domain, disk, running)
        untrusted = set(state.untrusted.get(target, ())) | _untrusted_after(reports)
        states, invalid = _bitmap_states(live_images)
        present = {bitmap.name for image in live_images for bitmap in image.bitmaps}
        untrusted &= present  # a bitmap deleted (or recreated by a new full backup) is forgiven
        if not any(r.error is not None and r.error.retryable for r in reports):
            self._store.put_disk(
                uuid,
                name=name,
                disk=target,
                chain=paths,
                untrusted=tuple(sorted(untrusted)),
                bitmaps={
                    image.path: seen_before[image.path]
                    if busy and image.path in seen_before
                    else image.bitmaps
                    for image in live_images
                },
                seen_at=started_at,
                generation=generation,
            )
        return replace(
            base,
            chain=paths,
            commits=tuple(reports),
            first_sight=first_sight,
            previous_chain=old,
            bitmap_states=states,
            untrusted=tuple(sorted(untrusted | invalid)),
        )

    def _current_chain(
        self, domain: libvirt.virDomain, disk: Disk, running: bool
    ) -> tuple[Disk, tuple[str, ...], tuple[Image, ...], bool]:
        """The disk as libvirt shows it, the chain's paths, its images with bitmaps as they
        really are now, and whether a block job was running on it meanwhile (then the bitmaps
        may be caught half-way through the job's own bitmap handling)."""
        if running:
            for _ in range(CHAIN_READ_ATTEMPTS):
                busy = _block_job_running(domain, disk.target)
                nodes = LibvirtMonitor(domain).execute(query_nodes())
                busy = busy or _block_job_running(domain, disk.target)
                again = _live_disk(domain, disk.target)
                if again == disk:
                    break
                disk = again  # the chain moved under us (a pivot): read it again
            else:
                raise ChainMoving(
                    f"{disk.layers[0].path}: the chain of {disk.target} kept changing"
                )
            result = []
            for layer in disk.layers:
                if layer.format is None:
                    raise ChainError(f"{layer.path}: libvirt names no format for this layer")
                bitmaps: tuple[Bitmap, ...] = ()
                with contextlib.suppress(KeyError):  # a layer QEMU does not show: no bitmaps
                    bitmaps = node_bitmaps(nodes, str(layer.format_node)).bitmaps
                result.append(Image(path=layer.path, format=layer.format, bitmaps=bitmaps))
            return disk, disk.paths, tuple(result), busy
        formats = {layer.path: layer.format for layer in disk.layers if layer.format}
        chain: Chain = images.read_chain(disk.layers[0].path, formats=formats)
        return disk, tuple(image.path for image in chain), chain.images, False

    def _reconcile(
        self,
        domain: libvirt.virDomain,
        disk: Disk,
        commit: Commit,
        *,
        running: bool,
        seen_before: Mapping[str, tuple[Bitmap, ...]],
        chain_now: tuple[Image, ...],
        old_chain: tuple[str, ...],
        last_look: float | None,
    ) -> CommitReport:
        """``seen_before``: each layer's bitmaps at the previous look, before the commit;
        ``old_chain``: the chain then; ``last_look``: when that look began."""
        remembered = seen_before.get(commit.base)
        base_before = (
            None
            if remembered is None
            else Image(path=commit.base, format="qcow2", bitmaps=remembered)
        )
        started = time.monotonic()
        try:
            if last_look is not None and commit.top == old_chain[0]:
                known = set(old_chain) | {image.path for image in chain_now}
                commit = _with_unseen_layers(
                    commit,
                    known,
                    last_look,
                    seen_before,
                    live=running,
                    storage_roots=self._roots,
                    raw_files=_raw_files_of_every_domain(domain),
                )
            _require_layers(commit, seen_before, chain_now)
            if running:
                done = reconcile_live(
                    LibvirtMonitor(domain),
                    disk,
                    commit,
                    storage_roots=self._roots,
                    base_before=base_before,
                    domain=domain.name(),
                )
            else:
                done = reconcile_at_rest(
                    commit.top, commit.base, storage_roots=self._roots, base_before=base_before
                )
        except VirtBitmapdError as error:
            return CommitReport(
                commit=commit,
                live=running,
                duration=time.monotonic() - started,
                error=error,
                suspects=()
                if error.retryable or isinstance(error, LayersOutOfQemuReach)
                else _suspects(commit, seen_before, chain_now),
            )
        return CommitReport(
            commit=commit,
            live=running,
            duration=time.monotonic() - started,
            result=done.result,
            plan=done.plan,
            outcome=done.outcome,
            error=BitsUnprovable(commit.base, done.why_untrusted, done.untrusted)
            if done.untrusted
            else None,
        )


# A bitmap skipped for these reasons may still look valid once the committed layers are gone
# (the gap, or the layer that did not record, leaves the chain), yet it misses their bits.  One
# missing from the commit top but present below it ends in the base without the top's bits.
_BROKEN_BY_COMMIT = (
    SkipReason.NOT_IN_TOP,
    SkipReason.GAP,
    SkipReason.DISABLED,
    SkipReason.INCONSISTENT,
    SkipReason.NOT_PERSISTENT,
)


def _untrusted_after(reports: Sequence[CommitReport]) -> set[str]:
    """Bitmaps these commits leave untrustworthy."""
    names: set[str] = set()
    for report in reports:
        if isinstance(report.error, BitsUnprovable):
            names.update(report.error.bitmaps)
        names.update(report.suspects)
        if report.plan is not None:
            names.update(s.bitmap for s in report.plan.skipped if s.reason in _BROKEN_BY_COMMIT)
    return names


CHAIN_READ_ATTEMPTS = 3


class ChainMoving(ChainError):
    """The chain changed each time it was read; the next look will find it settled."""

    retryable = True


def _block_job_running(domain: libvirt.virDomain, target: str) -> bool:
    try:
        return bool(domain.blockJobInfo(target, 0))
    except libvirt.libvirtError as error:
        raise LibvirtFailed(f"cannot ask about block jobs on {target}: {error}") from error


def _live_disk(domain: libvirt.virDomain, target: str) -> Disk:
    try:
        disks = parse_domain(domain.XMLDesc(0))
    except libvirt.libvirtError as error:
        raise LibvirtFailed(f"cannot read the domain: {error}") from error
    disk = next((d for d in disks.disks if d.target == target), None)
    if disk is None:
        raise ChainMoving(f"disk {target} went away while it was read")
    return _resolved(disk)


def _raw_files_of_every_domain(domain: libvirt.virDomain) -> set[str]:
    """Files any domain of the host uses as a disk in a format other than qcow2: their first
    bytes are a guest's, so a qcow2 header found there is believed by nobody."""
    try:
        domains = domain.connect().listAllDomains(0)
        documents = []
        for other in domains:
            documents.append(other.XMLDesc(0))
            if other.isActive() and other.isPersistent():  # the next boot's disks too
                documents.append(other.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
    except libvirt.libvirtError as error:
        raise LibvirtFailed(f"cannot list the host's disks: {error}") from error
    raw: set[str] = set()
    for document in documents:
        raw.update(os.path.realpath(path) for path in parse_domain(document).raw_files)
    return raw


def _with_unseen_layers(
    commit: Commit,
    known: set[str],
    since: float,
    seen_before: Mapping[str, tuple[Bitmap, ...]],
    *,
    live: bool,
    storage_roots: Sequence[str],
    raw_files: set[str],
) -> Commit:
    """The commit took the top of the chain we knew away.  Layers may have been made on that
    top since the last look (a snapshot just before an active commit, snapshots while the
    daemon was stopped) and committed with it: a plan from the known top alone would give the
    base bitmaps that miss their bits.  Their files still name what they were made on, so look
    for recent images backing onto the top, beside the chain's own.  One run of them joins the
    commit.  A fork cannot be resolved: at rest that is unrecoverable; live, libvirt merged
    from every layer itself, so the commit is verified on the layers known.

    Only qcow2 files under the storage roots that record qcow2 as their backing format count,
    never a file a domain uses as a raw disk (its header is its guest's).  A file that joins is
    then read as qcow2 like every layer; one that lacks a bitmap of the known top leaves that
    bitmap untrusted (see _BROKEN_BY_COMMIT), never silently short."""
    directories = {os.path.dirname(path) for path in known}
    backing_of = images.recent_overlays(
        directories,
        newer_than=since,
        exclude=known,
        storage_roots=storage_roots,
        not_overlays=raw_files,
    )
    above = layers_above(commit.top, backing_of)
    if above.unclear and live:
        return commit
    if above.unclear:
        suspects = {b.name for path in commit.removed for b in seen_before.get(path, ())}
        for path in above.unclear:
            with contextlib.suppress(VirtBitmapdError):
                suspects.update(b.name for b in images.read_image(path, force_share=True).bitmaps)
        raise UnseenLayersUnclear(commit.base, commit.top, above.unclear, tuple(sorted(suspects)))
    if not above.run:
        return commit
    if not live:
        _require_bitmaps_continued(commit, above.run[0], seen_before)
    return Commit(removed=above.run + commit.removed, base=commit.base)


def _require_bitmaps_continued(
    commit: Commit, new_top: str, seen_before: Mapping[str, tuple[Bitmap, ...]]
) -> None:
    """An overlay made on the committed top continues its recording bitmaps (libvirt's
    snapshots do); one that lacks some was not made so, or is not what its header claims.
    Either way which bits the base needs cannot be told: refuse rather than plan from it."""
    had = {b.name for b in seen_before.get(commit.top, ()) if b.recording}
    lacking = had - {b.name for b in images.read_image(new_top, force_share=True).bitmaps}
    if lacking:
        raise UnseenLayersUnclear(
            commit.base,
            commit.top,
            (new_top,),
            tuple(sorted(had)),
            why=f"it lacks {', '.join(repr(name) for name in sorted(lacking))}",
        )


def _require_layers(
    commit: Commit,
    seen_before: Mapping[str, tuple[Bitmap, ...]],
    chain_now: tuple[Image, ...],
) -> None:
    """Refuse a commit whose layers are already deleted: their bits cannot be proven to be in
    the base."""
    missing = tuple(path for path in commit.removed if not os.path.exists(path))
    if missing:
        raise CommittedLayersGone(commit.base, missing, _suspects(commit, seen_before, chain_now))


def _suspects(
    commit: Commit,
    seen_before: Mapping[str, tuple[Bitmap, ...]],
    chain_now: tuple[Image, ...],
) -> tuple[str, ...]:
    """Bitmaps that may miss the commit's bits when it could not be carried out: those the
    committed layers held when last seen (they may look valid now), and the base's own; all of
    the chain's if the layers were never seen."""
    suspects = {b.name for path in commit.removed for b in seen_before.get(path, ())}
    if not suspects:
        suspects = {b.name for image in chain_now for b in image.bitmaps}
    base = next((image for image in chain_now if image.path == commit.base), None)
    if base is not None:
        suspects.update(b.name for b in base.bitmaps)
    return tuple(sorted(suspects))


def _resolved(disk: Disk) -> Disk:
    layers = tuple(replace(layer, path=os.path.realpath(layer.path)) for layer in disk.layers)
    return replace(disk, layers=layers)


def _bitmap_states(chain: tuple[Image, ...]) -> tuple[dict[str, int], set[str]]:
    """Per state, how many of the chain's bitmaps are in it; and the names not valid."""
    states = {"valid": 0, "disabled": 0, "inconsistent": 0, "broken_chain": 0}
    invalid: set[str] = set()
    for name, problem in chain_problems(chain).items():
        if problem is None:
            states["valid"] += 1
        else:
            states[_STATE_OF_REASON[problem[0]]] += 1
            invalid.add(name)
    return states, invalid
