"""Filling: a checkpoint whose bits cannot be proven complete gets every bit set.  Pure: no I/O.

Disabling such a bitmap (the quarantine) makes libvirt refuse an incremental backup from it, but
``qemu-nbd --bitmap`` exports a disabled bitmap all the same, and an offline backup tool then
misses every write since.  Removing the bitmap breaks libvirt's deletion of the checkpoint.  A
bitmap with every bit set is complete for every reader: the next incremental backup copies the
whole disk once, nobody is refused, and the checkpoint chain and its deletion stay intact.

The bits are set in the top layer's copy (created there if it is missing, made to record again
if it was disabled): libvirt's backup merges the copies over the chain, and an offline reader
exports the top's.  From then on the checkpoint holds every write, as if it had been taken on
that layer with everything marked: the fill is where its bits begin (``births.chain_then``), and
what was distrusted before is settled.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .checkpoint_xml import Checkpoint, bitmap_created
from .model import QCOW2, Image

__all__ = ["FillStep", "Filled", "fills_now", "plan_fill"]


@dataclass(frozen=True, slots=True)
class FillStep:
    """One bitmap of the top layer made to hold every bit."""

    bitmap: str
    granularity: int
    #: the top holds no copy: one is created there
    create: bool = False
    #: the top's copy is disabled: it records again
    enable: bool = False


def plan_fill(chain: Sequence[Image], names: Iterable[str]) -> tuple[FillStep, ...]:
    """What filling ``names`` in the top of ``chain`` (top first) takes.  Left out: a bitmap
    no layer holds (no reader can export it, libvirt refuses it; and nothing says its
    granularity), and one whose top copy is inconsistent (QEMU changes no inconsistent bitmap,
    and every reader refuses it).  Nothing when the top is not qcow2."""
    if not chain or chain[0].format != QCOW2:
        return ()
    top = chain[0]
    steps = []
    for name in sorted(set(names)):
        copy = top.bitmap(name)
        if copy is not None:
            if not copy.inconsistent:
                steps.append(FillStep(name, copy.granularity, enable=not copy.recording))
            continue
        below = next((b for image in chain[1:] if (b := image.bitmap(name)) is not None), None)
        if below is not None:
            steps.append(FillStep(name, below.granularity, create=True))
    return tuple(steps)


@dataclass(frozen=True, slots=True, kw_only=True)
class Filled:
    """A bitmap filled by virt-bitmapd, remembered while it exists."""

    why: str
    #: the creationTime of the checkpoint of that name then (0: no checkpoint named it)
    checkpoint_created: int = 0
    #: the chain when it was filled, top (the layer filled) first
    chain: tuple[str, ...]
    #: when, in seconds since the epoch
    at: float

    def to_json(self) -> dict[str, Any]:
        return {
            "why": self.why,
            "checkpoint_created": self.checkpoint_created,
            "chain": list(self.chain),
            "at": self.at,
        }

    @classmethod
    def from_json(cls, raw: Any) -> Filled:
        """Raises KeyError, TypeError or ValueError on another shape."""
        chain = raw["chain"]
        if not isinstance(chain, list) or not chain or not all(isinstance(p, str) for p in chain):
            raise TypeError(f"a fill's chain must be a list of paths, not {chain!r:.80}")
        return cls(
            why=str(raw["why"]),
            checkpoint_created=int(raw.get("checkpoint_created", 0)),
            chain=tuple(chain),
            at=float(raw["at"]),
        )


def fills_now(
    remembered: Mapping[str, Filled],
    chain: Sequence[Image],
    checkpoints: Iterable[Checkpoint],
    target: str,
) -> dict[str, Filled]:
    """The fills that still stand: the bitmap is in ``chain``, and no checkpoint of another
    creation time names it (one taken again under the same name starts afresh; one libvirt
    does not list for now, as between a transient VM's start and the redefinition of its
    checkpoints, is kept)."""
    created = bitmap_created(checkpoints, target)
    present = {bitmap.name for image in chain for bitmap in image.bitmaps}
    return {
        name: filled
        for name, filled in remembered.items()
        if name in present
        and created.get(name, filled.checkpoint_created) == filled.checkpoint_created
    }
