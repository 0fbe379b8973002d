"""Each checkpoint of a disk judged against its chain: one set of rules for the daemon's looks
and for ``virt-bitmapd status``.  Pure: no I/O.

``distrust`` says which bitmaps cannot be proven complete (what was remembered and still holds,
what this look's commits could not carry, checkpoints whose birth layer went without its bits
or that nothing says where they were taken); ``judge`` gives each checkpoint its state and what
the next incremental backup from it does, with the healing hint where ``virt-bitmapd heal``
could rebuild it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence, Set
from dataclasses import dataclass, field

from ..births import Births
from ..checkpoint_xml import Checkpoint
from ..healing import HealPlan, annotate, plan_healing
from ..health import (
    CheckpointHealth,
    Distrust,
    disk_health,
    lost_layers,
    untrusted_now,
    while_busy,
)
from ..model import Image

__all__ = ["Evidence", "distrust", "healing_plan", "judge"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Evidence:
    """What, beside the chain, proves where the disk's checkpoints' bits live."""

    target: str
    #: libvirt's checkpoints of the domain
    checkpoints: Sequence[Checkpoint] = ()
    #: layer -> the layer virt-bitmapd saw it committed into with its bits
    merged_into: Mapping[str, str] = field(default_factory=dict)
    #: where each checkpoint was taken, as far as anything proves it
    births: Births = field(default_factory=dict)


def distrust(
    chain: Sequence[Image],
    evidence: Evidence,
    *,
    remembered: Mapping[str, Distrust],
    after_commits: Mapping[str, str],
    job: str | None = None,
) -> dict[str, Distrust]:
    """Bitmap -> why it is untrusted now.  ``remembered``: what earlier looks distrusted;
    ``after_commits``: what this look's commits could not carry (bitmap -> why); ``job``: a
    block job running on the disk, whose bitmaps may look gone half-way: nothing is forgiven."""
    lost = lost_layers(
        chain, evidence.checkpoints, evidence.target, evidence.merged_into, evidence.births
    )
    untrusted = untrusted_now(
        remembered, dict(after_commits) | lost, chain, evidence.checkpoints, evidence.target
    )
    return untrusted if job is None else {**remembered, **untrusted}


def healing_plan(chain: Sequence[Image], evidence: Evidence, untrusted: Set[str]) -> HealPlan:
    return plan_healing(
        tuple(chain),
        checkpoints=evidence.checkpoints,
        target=evidence.target,
        untrusted=set(untrusted),
        merged_into=dict(evidence.merged_into),
        births=evidence.births,
    )


def judge(
    chain: Sequence[Image],
    evidence: Evidence,
    untrusted: Mapping[str, Distrust],
    *,
    job: str | None = None,
) -> tuple[CheckpointHealth, ...]:
    """``job``: the block job running on the disk, if one is: then every checkpoint is busy."""
    why = {name: reason.why for name, reason in untrusted.items()}
    health = disk_health(chain, evidence.checkpoints, evidence.target, why)
    if job is not None:
        return while_busy(health, job)
    plan = healing_plan(chain, evidence, set(untrusted))
    return annotate(health, plan, chain[0].path)
