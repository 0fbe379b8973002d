"""Which checkpoints' copies cannot hold every write since they were taken.  Pure: no I/O.

libvirt creates a checkpoint's bitmap in the disk's active layer of the time (the checkpoint's
XML names that layer, and the chain below it then), and copies it into every overlay made on top
afterwards.  So the unbroken run of copies from the top must end in that layer, or, once that
layer was committed, in a layer it was committed into: one below it in the chain of the time, or
one virt-bitmapd saw it committed into.  A run that ends anywhere else ends in a layer made after
the checkpoint, and the writes between the checkpoint and that layer are in no copy.  A bitmap
virt-bitmapd filled begins where it was filled (``filling``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from .births import Births, chain_then
from .checkpoint_xml import Checkpoint, CheckpointDisk
from .filling import Filled
from .model import Image

__all__ = ["NO_BIRTH", "committed_into", "lost_layers", "run_bottom"]


def run_bottom(chain: Sequence[Image], bitmap: str) -> str | None:
    """The lowest layer of the unbroken run of ``bitmap``'s copies from the top, if any."""
    bottom = None
    for image in chain:
        if image.bitmap(bitmap) is None:
            break
        bottom = image.path
    return bottom


def committed_into(layer: str, merged_into: Mapping[str, str]) -> set[str]:
    """Every layer ``layer`` reached through commits virt-bitmapd saw handled well."""
    reached: set[str] = set()
    while layer in merged_into and merged_into[layer] not in reached:
        layer = merged_into[layer]
        reached.add(layer)
    return reached


#: Why a checkpoint whose birth layer nothing proves is not trusted.
NO_BIRTH = (
    "libvirt's checkpoint does not say which layer it was taken on (its XML has no <domain>) "
    "and virt-bitmapd did not see it said: its bits cannot be proven complete"
)


def _lost_reason(
    chain: Sequence[Image],
    disk: CheckpointDisk,
    checkpoint: Checkpoint,
    *,
    merged_into: Mapping[str, str],
    births: Births,
    filled: Mapping[str, Filled],
) -> str | None:
    """Why ``disk``'s copies of the checkpoint's bitmap cannot hold every write since it was
    taken; None when they can."""
    bottom = run_bottom(chain, disk.bitmap)
    if bottom is None:
        return None  # not in the top: libvirt refuses it, nothing is hidden
    then = chain_then(checkpoint, disk, births, filled)
    if then is None:
        return NO_BIRTH
    born_in = then[0]
    fine = {born_in, *then[1:], *committed_into(born_in, merged_into)}
    if bottom in fine:
        return None
    paths = [image.path for image in chain]
    if born_in in paths:
        return (
            f"its copy in {born_in} (the active layer when checkpoint {checkpoint.name} was "
            "taken) is gone: the writes made there are in no copy"
        )
    return (
        f"{born_in} (the active layer when checkpoint {checkpoint.name} was taken) left the "
        f"chain and its bits reached no layer that is left; its copies start only in {bottom}"
    )


def lost_layers(
    chain: Sequence[Image],
    checkpoints: Iterable[Checkpoint],
    target: str,
    *,
    merged_into: Mapping[str, str] | None = None,
    births: Births | None = None,
    filled: Mapping[str, Filled] | None = None,
) -> dict[str, str]:
    """Bitmap -> why, for each checkpoint bitmap of disk ``target`` whose copies in ``chain``
    (top first, paths as in the checkpoints) cannot hold every write since its checkpoint was
    taken.  ``merged_into``: layer -> the layer virt-bitmapd saw it committed into; ``births``:
    where virt-bitmapd remembers checkpoints were taken (for those whose XML does not say);
    ``filled``: the bitmaps virt-bitmapd filled (they begin there)."""
    lost = {}
    for checkpoint in checkpoints:
        disk = checkpoint.disk(target)
        if disk is None:
            continue
        reason = _lost_reason(
            chain,
            disk,
            checkpoint,
            merged_into=merged_into or {},
            births=births or {},
            filled=filled or {},
        )
        if reason is not None:
            lost[disk.bitmap] = reason
    return lost
