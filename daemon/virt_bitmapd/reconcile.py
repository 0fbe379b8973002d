"""Reconcile a commit base at rest: read the chain, plan, apply, verify.

This is the imperative shell around the planner for images no process holds open.  The chain is
read with QEMU's locks taken, so an image in use is refused before anything is planned; after
the transaction the base is read back and every merged bitmap must be present, recording and
consistent there, or the run fails.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from . import images
from .errors import ReconcileFailed
from .model import Image, Plan, Reconciliation, Result
from .planner import plan as make_plan
from .storage_roots import require_inside
from .transports.storage_daemon import apply_at_rest

__all__ = ["reconcile_at_rest"]


def reconcile_at_rest(
    top: str,
    base: str,
    *,
    storage_roots: Sequence[str] | None = None,
    dry_run: bool = False,
    base_before: Image | None = None,
) -> Reconciliation:
    """Carry TOP's valid checkpoint bitmaps into BASE.  ``storage_roots`` None means unrestricted
    (an administrator naming the images by hand); otherwise BASE must lie under one of them.
    ``base_before``: BASE's bitmaps as seen before the commit (see ``planner.plan``)."""
    real_base = os.path.realpath(base)
    if storage_roots is not None:
        require_inside(real_base, storage_roots)
    chain = images.read_chain(top)
    plan = make_plan(chain, chain.top.path, real_base, base_before=base_before)
    if plan.is_empty:
        return Reconciliation(plan=plan, result=Result.NOTHING_TO_DO)
    if dry_run:
        return Reconciliation(plan=plan, result=Result.PLANNED)
    outcome = apply_at_rest(plan)
    _verify_base(plan)
    result = Result.RECONCILED if outcome.changed else Result.ALREADY_CONSISTENT
    return Reconciliation(plan=plan, result=result, outcome=outcome)


def _verify_base(plan: Plan) -> None:
    unusable = plan.first_unusable(images.read_image(plan.base).bitmaps)
    if unusable is not None:
        raise ReconcileFailed.not_usable_after(plan.base, unusable)
