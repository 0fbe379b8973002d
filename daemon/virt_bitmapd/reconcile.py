"""Reconcile a commit base at rest: read the chain, plan, apply, verify.

This is the imperative shell around the planner for images no process holds open.  The chain is
read with QEMU's locks taken, so an image in use is refused before anything is planned; after
the transaction the base is read back and every merged bitmap must be present, recording and
consistent there, or the run fails.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence

from . import images
from .errors import (
    BitmapUnusableAfter,
    CrashDamagedBitmaps,
    ImageUnreadable,
    NoSpace,
    VirtBitmapdError,
)
from .model import Image, Plan, Reconciliation, Result
from .planner import plan as make_plan
from .storage_roots import require_inside
from .transports.storage_daemon import apply_at_rest

__all__ = ["reconcile_at_rest", "require_space"]


def reconcile_at_rest(
    top: str,
    base: str,
    *,
    storage_roots: Sequence[str] | None = None,
    dry_run: bool = False,
    base_before: Image | None = None,
) -> Reconciliation:
    """Carry TOP's valid checkpoint bitmaps into BASE, with their copies below BASE.
    ``storage_roots`` None means unrestricted (an administrator naming the images by hand);
    otherwise BASE must lie under one of them.
    ``base_before``: BASE's bitmaps as seen before the commit (see ``planner.plan``)."""
    real_base = os.path.realpath(base)
    if storage_roots is not None:
        require_inside(real_base, storage_roots)
    chain = images.read_chain(top)
    # BASE also takes the copies below it: after a top commit it is the disk's top, whose one
    # copy is all an offline reader exports (planner, ``unite``)
    plan = make_plan(chain, chain.top.path, real_base, base_before=base_before, unite=True)
    committed = tuple(image.path for image in chain.images[: chain.index_of(real_base)])
    if plan.is_empty:
        return Reconciliation(plan=plan, result=Result.NOTHING_TO_DO, committed=committed)
    if dry_run:
        return Reconciliation(plan=plan, result=Result.PLANNED, committed=committed)
    base_image = chain.images[chain.index_of(real_base) or 0]
    _require_space(plan, base_image)
    try:
        outcome = apply_at_rest(plan)
    except VirtBitmapdError as error:
        _require_undamaged(base_image, error)
        raise
    _verify_base(plan)
    result = Result.RECONCILED if outcome.changed else Result.ALREADY_CONSISTENT
    return Reconciliation(plan=plan, result=result, outcome=outcome, committed=committed)


def stored_bitmaps_size(virtual_size: int, granularities: Iterable[int], cluster_size: int) -> int:
    """Bytes QEMU may allocate to store bitmaps of these granularities when it closes an image
    of ``virtual_size``: it writes every bitmap anew before freeing the old clusters, each
    bitmap's data and table in whole clusters, plus the directory and refcount growth."""
    total = 4 * cluster_size
    for granularity in granularities:
        data = -(-virtual_size // granularity) // 8 + 1
        total += (-(-data // cluster_size) + 1) * cluster_size
    return total


def _require_space(plan: Plan, base: Image) -> None:
    require_space(base, {m.bitmap: m.granularity for m in plan.merges})


def require_space(image: Image, adding: Mapping[str, int]) -> None:
    """Refuse before opening ``image`` when its file system cannot hold its bitmaps once those
    of ``adding`` (name -> granularity) are added: QEMU would fail to store them on close and
    leave every one flagged in-use."""
    header = images.read_header(image.path)
    granularities = {b.name: b.granularity for b in image.bitmaps}
    granularities.update(adding)
    needed = stored_bitmaps_size(image.virtual_size, granularities.values(), header.cluster_size)
    try:
        info = os.statvfs(os.path.dirname(image.path))
    except OSError as error:
        raise ImageUnreadable(image.path, f"its file system cannot be read: {error}") from error
    free = info.f_bavail * info.f_frsize
    if free < needed:
        raise NoSpace(
            image.path,
            f"its file system has {free} bytes free and storing its bitmaps may need {needed}; "
            "nothing was changed",
        )


def _require_undamaged(before: Image, error: VirtBitmapdError) -> None:
    """After a failed transaction the base's bitmaps must be as they were.  A tool that died
    with the base open read-write leaves them flagged in-use: name exactly those that were
    usable before and are not now (libvirt refuses backups from them)."""
    try:
        now = images.read_image(before.path, force_share=True).bitmaps
    except VirtBitmapdError:
        return  # the base cannot be read now: the first error says enough
    usable_now = {bitmap.name for bitmap in now if bitmap.usable}
    damaged = tuple(sorted(b.name for b in before.bitmaps if b.usable and b.name not in usable_now))
    if damaged:
        raise CrashDamagedBitmaps(before.path, str(error), damaged) from error


def _verify_base(plan: Plan) -> None:
    unusable = plan.first_unusable(images.read_image(plan.base).bitmaps)
    if unusable is not None:
        raise BitmapUnusableAfter(plan.base, unusable)
