"""Each checkpoint of a disk judged against its chain: one set of rules for the daemon's looks
and for ``virt-bitmapd status``.  Pure: no I/O.

``distrust`` says which bitmaps cannot be proven complete (what was remembered and still holds,
what this look's commits could not carry, checkpoints whose birth layer went without its bits
or that nothing says where they were taken, checkpoints whose copy in the top was disabled);
``judge`` gives each checkpoint its state and what
the next incremental backup from it does, with the healing hint where ``virt-bitmapd heal``
could rebuild it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence, Set
from dataclasses import dataclass, field

from ..births import Births
from ..checkpoint_xml import Checkpoint, bitmap_created
from ..filling import Filled
from ..healing import HealPlan, annotate, plan_healing
from ..health import CheckpointHealth, Distrust, disk_health, untrusted_now, while_busy
from ..lost_bits import lost_layers
from ..model import Image

__all__ = ["Evidence", "disabled_in_top", "distrust", "healing_plan", "judge", "missing_in_top"]


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
    #: the bitmaps virt-bitmapd filled, which begin there
    filled: Mapping[str, Filled] = field(default_factory=dict)


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
        chain,
        evidence.checkpoints,
        evidence.target,
        merged_into=evidence.merged_into,
        births=evidence.births,
        filled=evidence.filled,
    )
    found = dict(after_commits) | lost
    if job is None:
        found |= disabled_in_top(chain, evidence.checkpoints, evidence.target)
    untrusted = untrusted_now(remembered, found, chain, evidence.checkpoints, evidence.target)
    return untrusted if job is None else {**remembered, **untrusted}


def disabled_in_top(
    chain: Sequence[Image], checkpoints: Sequence[Checkpoint], target: str
) -> dict[str, str]:
    """Checkpoint bitmaps whose copy in the top layer does not record: the writes since it
    stopped are in no copy.  libvirt refuses an incremental backup from such a checkpoint, but
    ``qemu-nbd --bitmap`` exports it, short."""
    if not chain:
        return {}
    top = chain[0]
    names = bitmap_created(checkpoints, target)
    return {
        name: f"its copy in {top.path} does not record: the writes since it stopped are in no copy"
        for name in sorted(names)
        if (copy := top.bitmap(name)) is not None and not copy.recording and not copy.inconsistent
    }


def missing_in_top(
    chain: Sequence[Image], checkpoints: Sequence[Checkpoint], target: str
) -> dict[str, str]:
    """Checkpoint bitmaps the top layer holds no copy of while a layer below does: libvirt
    refuses them, but ``qemu-nbd --bitmap`` exports the copy below, which misses every write
    made above it (an overlay made by a tool that copies no bitmap)."""
    if not chain:
        return {}
    top = chain[0]
    names = bitmap_created(checkpoints, target)
    found = {}
    for name in sorted(names):
        if top.bitmap(name) is not None:
            continue
        below = next((image.path for image in chain[1:] if image.bitmap(name)), None)
        if below is not None:
            found[name] = (
                f"{top.path} holds no copy of it: an offline reader exports the copy in "
                f"{below}, which misses what was written above it"
            )
    return found


def healing_plan(chain: Sequence[Image], evidence: Evidence, untrusted: Set[str]) -> HealPlan:
    return plan_healing(
        tuple(chain),
        checkpoints=evidence.checkpoints,
        target=evidence.target,
        untrusted=set(untrusted),
        merged_into=dict(evidence.merged_into),
        births=evidence.births,
        filled=evidence.filled,
    )


def judge(
    chain: Sequence[Image],
    evidence: Evidence,
    untrusted: Mapping[str, Distrust],
    *,
    job: str | None = None,
    united: bool = False,
) -> tuple[CheckpointHealth, ...]:
    """``job``: the block job running on the disk, if one is: then every checkpoint is busy;
    ``united``: the top's copies are known to hold the copies below them (``top_union``)."""
    why = {name: reason.why for name, reason in untrusted.items()}
    filled = {name: fill.why for name, fill in evidence.filled.items()}
    health = disk_health(
        chain, evidence.checkpoints, evidence.target, why, filled, top_united=united
    )
    if job is not None:
        return while_busy(health, job)
    plan = healing_plan(chain, evidence, set(untrusted))
    return annotate(health, plan, chain[0].path)
