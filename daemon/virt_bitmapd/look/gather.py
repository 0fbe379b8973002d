"""The look's first stage: every read it needs, each thing read once.  Blocking I/O, reads only.

What is read: the domain (name, running, its disks' XML), the disk's record in the state
directory (its chain, bitmaps and distrust at the last look), each layer's stat *before* any
image is read (a change made while the look reads shows at the next one), where the domain's
QEMU log ends and whether libvirt started the domain since the last look, the chain now (live
XML and QEMU's node data, or the image headers; or, at a startup, as the last look saw it when
nothing says it changed), the domain's libvirt checkpoints, and, when the chain moved, the
recent overlays beside it (maintenance between two looks may have hidden a commit) with the
host's disks they must be told from.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import libvirt

from ..checkpoint_xml import Checkpoint, names_of
from ..domain_xml import Disk
from ..errors import LibvirtFailed, OutsideStorageRoots, VirtBitmapdError
from ..fingerprints import Fingerprint, LayerStat, stat_layers, unchanged
from ..marks import Marks
from ..model import Bitmap
from ..readers.chain import ChainNow, current_chain, domain_disks, resolved
from ..readers.checkpoints import domain_checkpoints
from ..readers.host_disks import HostDisks, host_disks
from ..readers.qemu_log import LogMark, log_mark, started_since
from ..state import DomainState, StateStore
from ..storage_roots import require_inside
from .findings import NO_SUCH_DISK
from .unseen_layers import overlays_beside

__all__ = ["Gathered", "gather"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Gathered:
    domain: libvirt.virDomain
    name: str
    uuid: str
    target: str
    running: bool
    #: The state store's generation of the domain before anything was read.
    generation: int
    started_ns: int
    #: The domain's record as the last looks left it.
    record: DomainState
    #: Why the look ends here: the disk is gone or not ours to touch; or a read failed.
    skipped: str | None = None
    error: VirtBitmapdError | None = None
    #: Each layer's stat (old chain and new) taken before anything was read.
    stats_before: Mapping[str, LayerStat] = field(default_factory=dict)
    #: Where the domain's QEMU log ended before anything was read (None: not known).
    log_mark: LogMark | None = None
    #: Whether libvirt started the domain since the last look (None: the log cannot tell).
    started_since: bool | None = None
    #: When layers left the chain: each layer's stat after the chain was read.
    stats_after_read: Mapping[str, LayerStat] = field(default_factory=dict)
    now: ChainNow | None = None
    checkpoints: tuple[Checkpoint, ...] = ()
    checkpoint_error: VirtBitmapdError | None = None
    #: Recent qcow2 overlays beside the chains, each with what it backs onto.
    beside: Mapping[str, str] = field(default_factory=dict)
    host: HostDisks | None = None

    @property
    def old_chain(self) -> tuple[str, ...]:
        return self.record.chains.get(self.target, ())

    @property
    def last_look_at(self) -> float | None:
        """When the last look that saved a chain began (time.time())."""
        return self.record.looked_at.get(self.target)

    @property
    def last_marks(self) -> Marks | None:
        """Where things stood as the last look that saved a chain ended."""
        return self.record.marks.get(self.target)

    @property
    def last_bitmaps(self) -> Mapping[str, tuple[Bitmap, ...]]:
        """Each layer's bitmaps at the last look (what a base held before a commit)."""
        return self.record.bitmaps.get(self.target, {})


def gather(
    domain: libvirt.virDomain,
    target: str,
    store: StateStore,
    storage_roots: tuple[str, ...],
    *,
    trust_last_look: bool,
    log_dir: str | None = None,
) -> Gathered:
    """``trust_last_look`` (a startup): a shut-off disk whose layers' stats and checkpoints are
    what the last look saw is not read again; the bitmaps that look saw stand for its images.
    Raises LibvirtFailed when the domain cannot be read at all."""
    started_ns = time.time_ns()
    try:
        uuid = domain.UUIDString()
        generation = store.generation(uuid)  # before anything is read
        name = domain.name()
        # before the domain is read: a start from here on shows at the next look
        log_now = log_mark(log_dir, name)
        running = bool(domain.isActive())
    except libvirt.libvirtError as error:
        raise LibvirtFailed(f"cannot read the domain: {error}") from error
    disks = domain_disks(domain)
    record = store.load(uuid) or DomainState(uuid=uuid, name=name)
    gathered = Gathered(
        domain=domain,
        name=name,
        uuid=uuid,
        target=target,
        running=running,
        generation=generation,
        started_ns=started_ns,
        record=record,
        log_mark=log_now,
    )
    disk = next((d for d in disks.disks if d.target == target), None)
    if disk is None:  # detached, or not a file-backed qcow2 disk any more
        return replace(gathered, skipped=NO_SUCH_DISK)
    disk = resolved(disk)
    try:
        require_inside(disk.layers[0].path, storage_roots)
    except OutsideStorageRoots as error:
        return replace(gathered, skipped=str(error))
    old = gathered.old_chain
    stats = stat_layers({*old, *disk.paths})  # before anything is read
    last_fingerprint = record.fingerprints.get(target) if trust_last_look and not running else None
    checkpoints: tuple[Checkpoint, ...] | None = None
    checkpoint_error = None
    try:
        now = None
        if last_fingerprint is not None and old[: len(disk.paths)] == disk.paths:
            now, checkpoints = _as_last_looked(domain, disk, last_fingerprint, stats, record)
        if now is None:
            now = current_chain(domain, disk, running)
    except VirtBitmapdError as error:
        return replace(gathered, stats_before=stats, error=error)
    if set(old) - set(now.paths):  # layers left: was it a commit? (``proof``)
        last_marks = gathered.last_marks
        then = None if last_marks is None else last_marks.qemu_log
        gathered = replace(
            gathered,
            started_since=started_since(log_dir, name, then, log_now),
            # after the read: what made the layers leave (a commit's write) shows in these
            stats_after_read=stat_layers({*old, *now.paths}),
        )
    if checkpoints is None:
        try:
            checkpoints = domain_checkpoints(domain)
        except VirtBitmapdError as error:
            checkpoints, checkpoint_error = (), error
    beside: dict[str, str] = {}
    host = None
    if old and old != now.paths and gathered.last_look_at is not None:
        try:  # maintenance between two looks may have hidden a commit
            read_host = functools.cache(lambda: host_disks(domain.connect()))
            beside = overlays_beside(
                now.paths,
                old,
                since=gathered.last_look_at,
                storage_roots=storage_roots,
                host=read_host,  # only if files changed is the whole host read
            )
            host = read_host() if beside else None
        except VirtBitmapdError as error:
            return replace(gathered, stats_before=stats, now=now, error=error)
    return replace(
        gathered,
        stats_before=stats,
        now=now,
        checkpoints=checkpoints,
        checkpoint_error=checkpoint_error,
        beside=beside,
        host=host,
    )


def _as_last_looked(
    domain: libvirt.virDomain,
    disk: Disk,
    fingerprint: Fingerprint,
    stats: Mapping[str, LayerStat],
    record: DomainState,
) -> tuple[ChainNow | None, tuple[Checkpoint, ...] | None]:
    """The chain of a shut-off disk as its last look saw it, when nothing says it changed
    since: every layer's stat and the domain's checkpoints the same (and those checkpoints,
    read to know)."""
    images = fingerprint.images(record.bitmaps.get(disk.target, {}))
    if images is None or not unchanged(fingerprint, chain=None, checkpoints=None, stats=stats):
        return None, None
    checkpoints = domain_checkpoints(domain)
    if names_of(checkpoints) != fingerprint.checkpoints:
        return None, checkpoints
    return ChainNow(disk=disk, paths=fingerprint.chain, images=images), checkpoints
