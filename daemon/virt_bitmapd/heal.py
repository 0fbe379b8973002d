"""Heal broken checkpoint bitmaps at rest: read the chain, plan (``healing``), apply, verify.

The imperative shell around ``healing.plan_healing`` for images no process holds open.  The
chain is read with QEMU's locks taken, so a chain in use is refused before anything is planned.
Each image gets one qemu-storage-daemon run and one transaction; afterwards the chain is read
back and every healed bitmap must have a chain libvirt accepts, or the run fails.
"""

from __future__ import annotations

import enum
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from . import images
from .births import Births
from .checkpoint_xml import Checkpoint
from .errors import BitmapUnusableAfter
from .filling import Filled
from .healing import HealPlan, plan_healing
from .model import Chain
from .planner import bitmap_chain_problem
from .reconcile import require_space
from .storage_roots import require_inside
from .transports.storage_daemon import heal_at_rest

__all__ = ["HealResult", "Healing", "heal_chain"]


class HealResult(enum.Enum):
    NOTHING_TO_DO = "nothing to do"
    PLANNED = "planned"
    HEALED = "healed"


@dataclass(frozen=True, slots=True, kw_only=True)
class Healing:
    plan: HealPlan
    result: HealResult
    chain: Chain


def heal_chain(
    top: str,
    *,
    storage_roots: Sequence[str] | None,
    dry_run: bool = False,
    formats: Mapping[str, str] | None = None,
    checkpoints: Sequence[Checkpoint] = (),
    target: str = "",
    untrusted: Collection[str] = (),
    merged_into: dict[str, str] | None = None,
    births: Births | None = None,
    filled: Mapping[str, Filled] | None = None,
) -> Healing:
    """Rebuild what ``healing.plan_healing`` accepts in the chain of ``top`` (opened as qcow2,
    layers below as their overlays record, or as ``formats`` says).  ``storage_roots`` None:
    any image a person names; otherwise every image to change must lie under one of them."""
    chain = images.read_chain(top, formats=formats)
    plan = plan_healing(
        chain.images,
        checkpoints=checkpoints,
        target=target,
        untrusted=untrusted,
        merged_into=merged_into,
        births=births,
        filled=filled,
    )
    if not plan.steps:
        return Healing(plan=plan, result=HealResult.NOTHING_TO_DO, chain=chain)
    if dry_run:
        return Healing(plan=plan, result=HealResult.PLANNED, chain=chain)
    for path in plan.images:
        if storage_roots is not None:
            require_inside(path, storage_roots)
        image = chain.images[chain.index_of(path) or 0]
        require_space(image, {s.bitmap: s.granularity for s in plan.steps_for(path)})
    for path in plan.images:
        heal_at_rest(path, plan.steps_for(path))
    after = images.read_chain(top, formats=formats)
    for name in plan.bitmaps:
        problem = bitmap_chain_problem(after.images, name)
        if problem is not None:
            raise BitmapUnusableAfter(problem[1], name)
    return Healing(plan=plan, result=HealResult.HEALED, chain=after)
