"""Turn a backing chain's bitmaps into what a commit base needs.  Pure: no I/O.

How this works (libvirt's semantics, as in its ``qemuBlockBitmapChainIsValid`` and
``qemuBlockGetBitmapMergeActions``, and its "Committing external snapshots manually" note):

* A bitmap's chain is *valid* when, walking from the commit TOP down to the END of the whole
  chain (not only down to BASE), the images holding it form one unbroken run starting at TOP and
  every copy in that run is recording, persistent and consistent.
* Every bitmap of TOP with a valid chain is a candidate.  Its sources are its copies from TOP down
  to the image just above BASE, stopping at the first image without it; its granularity is TOP's.
* If BASE lacks the bitmap it is created there (persistent, recording); then the sources are
  merged into it.  A merge is a bitwise OR, so BASE's own bits stay and a second application
  changes nothing.
* Everything else is left alone and reported, with the reason and the image it was found in.

libvirt judges validity on the chain as it is *before* the commit.  Looking afterwards (the daemon
does), the base may already carry bitmaps that libvirt created there, which would read as gaps;
so the caller can pass the base as it was before (``base_before``) for the validity walk, while
what the base needs is still decided on the base as it is now.

``unite`` adds the copies *below* BASE to each merge's sources, so that BASE's copy also holds
every bit of the chain under it (the union libvirt's backup computes).  After a top commit BASE
is the disk's top, and a reader that exports one copy (``qemu-nbd --bitmap``) then reads them
all; bits are only added, so libvirt's answer does not change (see ``plan_union``).
"""

from __future__ import annotations

from .errors import BaseCannotHoldBitmaps, ChainError
from .model import Bitmap, BitmapMerge, Chain, Image, Plan, Skip, SkipReason

__all__ = ["bitmap_chain_problem", "chain_problems", "plan", "plan_union"]


def _copy_problem(bitmap: Bitmap) -> SkipReason | None:
    if bitmap.inconsistent:
        return SkipReason.INCONSISTENT
    if not bitmap.recording:
        return SkipReason.DISABLED
    if not bitmap.persistent:
        return SkipReason.NOT_PERSISTENT
    return None


def bitmap_chain_problem(images: tuple[Image, ...], name: str) -> tuple[SkipReason, str] | None:
    """Why bitmap ``name`` has no valid chain over ``images`` (top first), or None if it has one.

    Returns the reason and the image where it was found, walking from the top.  ``images``
    must not be empty.
    """
    if images[0].bitmap(name) is None:
        return SkipReason.NOT_IN_TOP, images[0].path
    run_ended = False
    for image in images:
        bitmap = image.bitmap(name)
        if bitmap is None:
            run_ended = True
            continue
        if run_ended:
            return SkipReason.GAP, image.path
        problem = _copy_problem(bitmap)
        if problem is not None:
            return problem, image.path
    return None


def chain_problems(images: tuple[Image, ...]) -> dict[str, tuple[SkipReason, str] | None]:
    """Every bitmap name in ``images`` (top first, in order of first sight) with why its chain
    is not valid from the top, or None when it is."""
    names: dict[str, None] = {}
    for image in images:
        for bitmap in image.bitmaps:
            names.setdefault(bitmap.name, None)
    return {name: bitmap_chain_problem(images, name) for name in names}


def _locate(chain: Chain, top: str, base: str) -> tuple[int, int]:
    top_index = chain.index_of(top)
    if top_index is None:
        raise ChainError(f"{top}: the commit top is not in the chain of {chain.top.path}")
    base_index = chain.index_of(base)
    if base_index is None or base_index <= top_index:
        raise ChainError(f"{base}: the commit base is not below {top} in its backing chain")
    return top_index, base_index


def plan(
    chain: Chain, top: str, base: str, *, base_before: Image | None = None, unite: bool = False
) -> Plan:
    """The bitmap changes that BASE needs after TOP .. the image above BASE are committed into it.

    ``base_before``: BASE as it was before the commit, when ``chain`` holds it as it is after.
    ``unite``: also merge each bitmap's copies below BASE into BASE.
    Raises ChainError when BASE is not below TOP in ``chain``, and BaseCannotHoldBitmaps when
    BASE is not qcow2 but valid bitmaps would have to go there.
    """
    top_index, base_index = _locate(chain, top, base)
    base_image = chain.images[base_index]
    if base_before is not None and base_before.path != base:
        raise ChainError(f"{base_before.path}: given as the base before the commit of {base}")
    before = list(chain.images[top_index:])
    if base_before is not None:
        before[base_index - top_index] = base_before
    from_top = tuple(before)
    subchain = chain.images[top_index:base_index]
    below_base = chain.images[base_index + 1 :] if unite else ()

    merges: list[BitmapMerge] = []
    skipped: list[Skip] = []
    for bitmap in from_top[0].bitmaps:
        problem = bitmap_chain_problem(from_top, bitmap.name)
        if problem is not None:
            reason, where = problem
            skipped.append(Skip(bitmap=bitmap.name, image=where, reason=reason))
            continue
        sources: list[str] = []
        for image in subchain:
            if image.bitmap(bitmap.name) is None:
                break
            sources.append(image.path)
        # a valid chain is one unbroken run from TOP: the holders below BASE continue it
        sources += [image.path for image in below_base if image.bitmap(bitmap.name) is not None]
        merges.append(
            BitmapMerge(
                bitmap=bitmap.name,
                granularity=bitmap.granularity,
                create_in_base=base_image.bitmap(bitmap.name) is None,
                sources=tuple(sources),
            )
        )

    in_top = {bitmap.name for bitmap in from_top[0].bitmaps}
    for image in chain.images[top_index + 1 : base_index + 1]:
        for bitmap in image.bitmaps:
            if bitmap.name not in in_top:
                in_top.add(bitmap.name)  # report each such name once, where first seen
                skipped.append(
                    Skip(bitmap=bitmap.name, image=image.path, reason=SkipReason.NOT_IN_TOP)
                )
    if merges and not base_image.can_hold_bitmaps:
        raise BaseCannotHoldBitmaps(base, base_image.format, tuple(m.bitmap for m in merges))
    return Plan(top=top, base=base, merges=tuple(merges), skipped=tuple(skipped))


def plan_union(images: tuple[Image, ...]) -> Plan:
    """What the top layer needs for its copy of each bitmap to hold every bit of the chain
    (``images``, top first): the copies below it ORed in.  Only bitmaps whose chain is valid
    (libvirt's backup merges exactly those copies, so its answer does not change), and only
    those with a copy below the top.  Bits are only added."""
    top = images[0]
    merges = []
    for bitmap in top.bitmaps:
        if bitmap_chain_problem(images, bitmap.name) is not None:
            continue
        sources = tuple(i.path for i in images[1:] if i.bitmap(bitmap.name) is not None)
        if sources:
            merges.append(
                BitmapMerge(
                    bitmap=bitmap.name,
                    granularity=bitmap.granularity,
                    create_in_base=False,
                    sources=sources,
                )
            )
    return Plan(top=top.path, base=top.path, merges=tuple(merges))
