"""Which checkpoints a backup can trust, disk by disk.  Pure: no I/O.

libvirt accepts an incremental backup from a checkpoint when the checkpoint's bitmap has a valid
chain from the disk's top (``planner.bitmap_chain_problem``).  That rule sees only the bitmaps that
are there; it cannot see a layer that is gone.  Two more facts settle what it misses: the run of
copies from the top must end where the checkpoint was taken (``lost_bits``), and virt-bitmapd
remembers the bitmaps whose bits a commit could not carry (untrusted).

Each (checkpoint, disk) is then *usable*, *broken* (libvirt refuses it), *untrusted* (libvirt
would accept it but it may miss data, or it was quarantined), or *missing*; a bitmap no
checkpoint names is an *orphan* (or *untrusted*: another backup tool may use it).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

from .checkpoint_xml import Checkpoint, bitmap_created
from .model import Image, SkipReason
from .offline_export import OfflineExport, offline_export
from .planner import bitmap_chain_problem

__all__ = [
    "CheckpointHealth",
    "Distrust",
    "NextBackup",
    "State",
    "disk_health",
    "to_quarantine",
    "untrusted_now",
    "while_busy",
]


class State(enum.Enum):
    USABLE = "usable"
    BROKEN = "broken"
    UNTRUSTED = "untrusted"
    MISSING = "missing"
    ORPHAN = "orphan_bitmap"
    #: a block job runs on the disk: its bitmaps may be half-way through the job's own
    #: handling, and are judged when it ends
    BUSY = "busy"


class NextBackup(enum.Enum):
    """What an incremental backup from the checkpoint does next."""

    SAFE = "safe"
    #: every bit is set (virt-bitmapd filled it): complete, and as long as the whole disk
    WHOLE_DISK = "complete: the whole disk"
    REFUSED = "refused by libvirt"
    MISSES_DATA = "would miss data"
    NONE = "no checkpoint"
    AFTER_JOB = "judged when the job ends"


@dataclass(frozen=True, slots=True, kw_only=True)
class CheckpointHealth:
    disk: str
    bitmap: str
    #: None for an orphan bitmap.
    checkpoint: str | None
    state: State
    next_backup: NextBackup
    reason: str = ""
    #: The layer the reason was found in, when there is one.
    layer: str | None = None
    #: What an offline export of its bitmap (``qemu-nbd --bitmap``) does next, and why.
    offline: OfflineExport = OfflineExport.NONE
    offline_reason: str = ""


@dataclass(frozen=True, slots=True)
class Distrust:
    """Why a bitmap's bits cannot be proven complete, remembered until the bitmap goes."""

    why: str
    #: The creationTime of the checkpoint of that name then (0: unknown).  A checkpoint
    #: deleted and taken again under the same name is a new one, and trusted afresh.
    checkpoint_created: int = 0


def untrusted_now(
    remembered: Mapping[str, Distrust],
    found: Mapping[str, str],
    chain: Sequence[Image],
    checkpoints: Iterable[Checkpoint],
    target: str,
) -> dict[str, Distrust]:
    """What was untrusted and still is, then what a look ``found`` (bitmap -> why).  A bitmap is
    forgiven when it is gone from ``chain`` (deleted with its checkpoint, or by a new full
    backup) or when its checkpoint was taken again under the same name."""
    created = bitmap_created(checkpoints, target)
    present = {bitmap.name for image in chain for bitmap in image.bitmaps}

    def retaken(name: str, distrust: Distrust) -> bool:
        now = created.get(name, 0)
        return bool(distrust.checkpoint_created and now and now != distrust.checkpoint_created)

    kept = {
        name: distrust
        for name, distrust in remembered.items()
        if name in present and not retaken(name, distrust)
    }
    for name, why in found.items():
        if name in present:
            kept.setdefault(name, Distrust(why, created.get(name, 0)))
    return kept


def _broken(problem: tuple[SkipReason, str]) -> str:
    reason, layer = problem
    return f"{reason.value} in {layer}"


def disk_health(
    chain: Sequence[Image],
    checkpoints: Iterable[Checkpoint],
    target: str,
    untrusted: Mapping[str, str],
    filled: Mapping[str, str] | None = None,
    *,
    top_united: bool = False,
) -> tuple[CheckpointHealth, ...]:
    """Every checkpoint of disk ``target``, and every bitmap of its ``chain`` (top first) that no
    checkpoint names, classified, for libvirt's backup and for an offline export.
    ``untrusted``: bitmap -> why its bits cannot be proven (what virt-bitmapd remembers, with
    ``lost_bits.lost_layers`` added); ``filled``: bitmap -> why virt-bitmapd set its every bit;
    ``top_united``: the top's copies hold the copies below them (``top_union``)."""
    images = tuple(chain)
    found: list[CheckpointHealth] = []
    named: set[str] = set()
    for checkpoint in checkpoints:
        disk = checkpoint.disk(target)
        if disk is None:
            continue
        named.add(disk.bitmap)
        found.append(
            _one(
                images,
                target,
                disk.bitmap,
                checkpoint.name,
                untrusted=untrusted,
                filled=filled or {},
                top_united=top_united,
            )
        )
    orphans: dict[str, str] = {}
    for image in images:
        for bitmap in image.bitmaps:
            if bitmap.name not in named:
                orphans.setdefault(bitmap.name, image.path)
    for name, layer in orphans.items():
        # a bitmap without a libvirt checkpoint may still serve another backup tool
        distrusted = name in untrusted
        found.append(
            CheckpointHealth(
                disk=target,
                bitmap=name,
                checkpoint=None,
                state=State.UNTRUSTED if distrusted else State.ORPHAN,
                next_backup=NextBackup.NONE,
                reason="no libvirt checkpoint names this bitmap"
                + (f"; {untrusted[name]}" if distrusted else ""),
                layer=layer,
            )
        )
    return tuple(found)


def _one(
    images: tuple[Image, ...],
    target: str,
    bitmap: str,
    checkpoint: str,
    *,
    untrusted: Mapping[str, str],
    filled: Mapping[str, str],
    top_united: bool,
) -> CheckpointHealth:
    problem = bitmap_chain_problem(images, bitmap)
    offline, offline_reason = offline_export(
        images,
        bitmap,
        untrusted=bitmap in untrusted,
        filled=bitmap in filled,
        valid=problem is None,
        top_united=top_united,
    )

    def health(
        state: State, next_backup: NextBackup, reason: str, layer: str | None = None
    ) -> CheckpointHealth:
        return CheckpointHealth(
            disk=target,
            bitmap=bitmap,
            checkpoint=checkpoint,
            state=state,
            next_backup=next_backup,
            reason=reason,
            layer=layer,
            offline=offline,
            offline_reason=offline_reason,
        )

    if not any(image.bitmap(bitmap) for image in images):
        return health(State.MISSING, NextBackup.REFUSED, "no layer of the chain holds its bitmap")
    if bitmap in untrusted:
        if problem is None:
            return health(State.UNTRUSTED, NextBackup.MISSES_DATA, untrusted[bitmap])
        return health(
            State.UNTRUSTED,
            NextBackup.REFUSED,
            f"{untrusted[bitmap]}; quarantined: {_broken(problem)}",
            problem[1],
        )
    if problem is not None:
        return health(State.BROKEN, NextBackup.REFUSED, _broken(problem), problem[1])
    if bitmap in filled:
        return health(State.USABLE, NextBackup.WHOLE_DISK, f"filled because {filled[bitmap]}")
    return health(State.USABLE, NextBackup.SAFE, "")


def while_busy(health: Iterable[CheckpointHealth], job: str) -> tuple[CheckpointHealth, ...]:
    """Every checkpoint of a disk a block job runs on, as ``busy``: no verdict (the bitmaps may
    be caught half-way through the job's own handling), none of a state's warnings or hints."""
    return tuple(
        replace(
            entry,
            state=State.BUSY,
            next_backup=NextBackup.AFTER_JOB,
            reason=f"a {job} job is running on the disk",
            layer=None,
            offline=OfflineExport.AFTER_JOB,
            offline_reason="",
        )
        for entry in health
    )


def to_quarantine(chain: Sequence[Image], untrusted: Iterable[str]) -> tuple[str, ...]:
    """The untrusted bitmaps whose top copy still records and is consistent.  Disabling that
    copy is enough for libvirt to refuse them (every copy must record), and libvirt copies no
    disabled bitmap into a new overlay.  An inconsistent copy is refused already (and QEMU
    would not change it)."""
    if not chain:
        return ()
    top = chain[0]
    return tuple(
        sorted(
            name
            for name in set(untrusted)
            if (copy := top.bitmap(name)) is not None and copy.recording and not copy.inconsistent
        )
    )
