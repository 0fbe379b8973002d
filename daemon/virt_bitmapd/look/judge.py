"""Each checkpoint of a disk judged against its chain: one set of rules for the daemon's looks
and for ``virt-bitmapd status``.  Pure: no I/O.

``distrust`` says which bitmaps cannot be proven complete (what was remembered and still holds,
what this look's commits could not carry, checkpoints whose birth layer went without its bits);
``judge`` gives each checkpoint its state and what the next incremental backup from it does,
with the healing hint where ``virt-bitmapd heal`` could rebuild it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence, Set

from ..checkpoint_xml import Checkpoint
from ..healing import HealPlan, annotate, plan_healing
from ..health import CheckpointHealth, Distrust, disk_health, lost_layers, untrusted_now
from ..model import Image

__all__ = ["distrust", "healing_plan", "judge"]


def distrust(
    chain: Sequence[Image],
    checkpoints: Sequence[Checkpoint],
    target: str,
    *,
    remembered: Mapping[str, Distrust],
    after_commits: Mapping[str, str],
    merged_into: Mapping[str, str],
) -> dict[str, Distrust]:
    """Bitmap -> why it is untrusted now.  ``remembered``: what earlier looks distrusted;
    ``after_commits``: what this look's commits could not carry (bitmap -> why)."""
    found = dict(after_commits) | lost_layers(chain, checkpoints, target, merged_into)
    return untrusted_now(remembered, found, chain, checkpoints, target)


def healing_plan(
    chain: Sequence[Image],
    checkpoints: Sequence[Checkpoint],
    target: str,
    untrusted: Set[str],
    merged_into: Mapping[str, str],
) -> HealPlan:
    return plan_healing(
        tuple(chain),
        checkpoints=checkpoints,
        target=target,
        untrusted=set(untrusted),
        merged_into=dict(merged_into),
    )


def judge(
    chain: Sequence[Image],
    checkpoints: Sequence[Checkpoint],
    target: str,
    untrusted: Mapping[str, Distrust],
    merged_into: Mapping[str, str],
) -> tuple[CheckpointHealth, ...]:
    why = {name: reason.why for name, reason in untrusted.items()}
    health = disk_health(chain, checkpoints, target, why)
    plan = healing_plan(chain, checkpoints, target, set(untrusted), merged_into)
    return annotate(health, plan, chain[0].path)
