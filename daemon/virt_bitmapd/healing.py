"""Which broken checkpoint bitmaps can be rebuilt without ever under-reporting.  Pure: no I/O.

libvirt creates a checkpoint's bitmap only in the disk's active layer, so every layer above the
lowest copy of a bitmap (the layer the checkpoint was taken on, the *anchor*) was made after the
checkpoint.  A qcow2 overlay starts empty: its allocated clusters are a superset of everything
written into it since it was made, hence since the checkpoint.  A copy missing from such an
overlay (one made by ``qemu-img create`` or another tool that does not copy bitmaps) can
therefore be rebuilt from the overlay's allocation map: a backup from it may hold a few blocks
more than changed, never fewer.

The argument does not hold, and nothing is rebuilt, when the anchor's own copy is disabled or
inconsistent (what was written into the anchor since is unknown), when a copy above it is
(its bits are neither usable nor rebuildable by this rule), when the bitmap is untrusted, when
libvirt's checkpoint says it was taken on another layer (the anchor is not where it was born),
or when a layer above the anchor existed before the checkpoint.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

from .births import Births
from .checkpoint_xml import Checkpoint
from .filling import Filled
from .health import CheckpointHealth, State
from .lost_bits import lost_layers
from .model import Image
from .planner import bitmap_chain_problem

__all__ = ["HealPlan", "HealStep", "Refusal", "annotate", "plan_healing"]


@dataclass(frozen=True, slots=True, kw_only=True)
class HealStep:
    """Create ``bitmap`` in ``image`` from the image's own allocation map."""

    image: str
    bitmap: str
    granularity: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Refusal:
    bitmap: str
    reason: str
    layer: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class HealPlan:
    steps: tuple[HealStep, ...] = ()
    refused: tuple[Refusal, ...] = ()

    @property
    def images(self) -> tuple[str, ...]:
        """The images to change, in chain order, once each."""
        return tuple(dict.fromkeys(step.image for step in self.steps))

    def steps_for(self, image: str) -> tuple[HealStep, ...]:
        return tuple(step for step in self.steps if step.image == image)

    @property
    def bitmaps(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(step.bitmap for step in self.steps))


def _born_in(checkpoints: Iterable[Checkpoint], target: str, bitmap: str) -> tuple[str, ...]:
    """The chain (top first) the checkpoint of ``bitmap`` was taken on, if libvirt says."""
    for checkpoint in checkpoints:
        disk = checkpoint.disk(target)
        if disk is not None and disk.bitmap == bitmap:
            return disk.chain_then
    return ()


def _one(
    chain: tuple[Image, ...], name: str, then: tuple[str, ...]
) -> tuple[list[HealStep], Refusal | None]:
    holders = [index for index, image in enumerate(chain) if image.bitmap(name) is not None]
    anchor = chain[holders[-1]]
    anchor_copy = anchor.bitmap(name)
    assert anchor_copy is not None
    if then and then[0] != anchor.path:
        return [], Refusal(
            bitmap=name,
            reason=f"its checkpoint was taken on {then[0]}, but its lowest copy is in "
            f"{anchor.path}",
            layer=anchor.path,
        )
    if not anchor_copy.usable:
        state = "inconsistent" if anchor_copy.inconsistent else "disabled"
        return [], Refusal(
            bitmap=name,
            reason=f"its copy in {anchor.path}, the layer its checkpoint was taken on, is "
            f"{state}: what was written there since is unknown",
            layer=anchor.path,
        )
    steps = []
    for image in chain[: holders[-1]]:
        copy = image.bitmap(name)
        if image.path in then:
            return [], Refusal(
                bitmap=name,
                reason=f"{image.path} existed before the checkpoint was taken: its allocation "
                "says nothing of what changed since",
                layer=image.path,
            )
        if copy is not None and not copy.usable:
            return [], Refusal(
                bitmap=name,
                reason=f"its copy in {image.path} is not recording and consistent; it is not "
                "rebuilt",
                layer=image.path,
            )
        if copy is None:
            if not image.can_hold_bitmaps:
                return [], Refusal(
                    bitmap=name,
                    reason=f"{image.path} is {image.format}, which cannot hold bitmaps",
                    layer=image.path,
                )
            steps.append(
                HealStep(image=image.path, bitmap=name, granularity=anchor_copy.granularity)
            )
    return steps, None


def plan_healing(
    chain: Sequence[Image],
    *,
    checkpoints: Sequence[Checkpoint] = (),
    target: str = "",
    untrusted: Collection[str] = (),
    merged_into: dict[str, str] | None = None,
    births: Births | None = None,
    filled: Mapping[str, Filled] | None = None,
) -> HealPlan:
    """How to rebuild every bitmap of ``chain`` (top first) whose chain libvirt finds broken
    only because layers above its lowest copy lack it; the others, refused with the reason.
    ``checkpoints`` (libvirt's, for disk ``target``), ``untrusted`` (what virt-bitmapd
    distrusts), ``merged_into``, ``births`` and ``filled`` narrow what is accepted; without
    them, libvirt's rule that a bitmap is only ever created in the active layer is relied on."""
    images = tuple(chain)
    if not images:
        return HealPlan()
    lost = (
        lost_layers(
            images, checkpoints, target, merged_into=merged_into, births=births, filled=filled
        )
        if checkpoints
        else {}
    )
    names = dict.fromkeys(bitmap.name for image in images for bitmap in image.bitmaps)
    steps: list[HealStep] = []
    refused: list[Refusal] = []
    for name in names:
        if bitmap_chain_problem(images, name) is None:
            continue
        if name in untrusted or name in lost:
            refused.append(
                Refusal(bitmap=name, reason="virt-bitmapd cannot prove its bits complete")
            )
            continue
        found, refusal = _one(images, name, _born_in(checkpoints, target, name))
        if refusal is not None:
            refused.append(refusal)
        else:
            steps.extend(found)
    return HealPlan(steps=tuple(steps), refused=tuple(refused))


def annotate(
    health: Sequence[CheckpointHealth], plan: HealPlan, top: str
) -> tuple[CheckpointHealth, ...]:
    """``health`` with each broken checkpoint's reason saying whether healing can fix it."""
    refused = {refusal.bitmap: refusal.reason for refusal in plan.refused}
    healable = set(plan.bitmaps)
    annotated = []
    for entry in health:
        reason = entry.reason
        if entry.state is State.BROKEN and entry.bitmap in healable:
            reason += f"; healable at rest: virt-bitmapd heal {top}"
        elif entry.state is State.BROKEN and entry.bitmap in refused:
            reason += f"; not healable: {refused[entry.bitmap]}"
        annotated.append(replace(entry, reason=reason))
    return tuple(annotated)
