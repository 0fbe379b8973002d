"""Where each checkpoint was taken: libvirt's word, or what virt-bitmapd saw.  Pure: no I/O.

libvirt's checkpoint XML embeds the domain as it was when the checkpoint was taken, and so names
the layer its bitmap was born in: what proves, after layers went away, that the bitmap's copies
still hold every write since (``health.lost_layers``).  A checkpoint can be redefined without
that part (libvirt accepts it; oVirt redefines its checkpoints so whenever a VM starts).  Then
the only proof is what virt-bitmapd itself remembered of the checkpoint while libvirt still said
it: a checkpoint of the same name and creation time.  Without either, nothing proves where its
bits began, and it is not trusted.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from .checkpoint_xml import Checkpoint, CheckpointDisk
from .filling import Filled

__all__ = ["MAX_REMEMBERED", "Births", "births_now", "chain_then"]

#: checkpoint name -> (its creationTime, the layer it was taken on)
Births = Mapping[str, tuple[int, str]]

#: A disk's births kept at most (the newest): checkpoints come and go with full backups.
MAX_REMEMBERED = 64


def births_now(
    checkpoints: Iterable[Checkpoint], target: str, remembered: Births
) -> dict[str, tuple[int, str]]:
    """What to remember of where the disk's checkpoints were taken: libvirt's word wherever its
    XML has it, else what was remembered (kept while libvirt does not list the checkpoint, as
    between a transient VM's start and the redefinition of its checkpoints)."""
    births = dict(remembered)
    for checkpoint in checkpoints:
        disk = checkpoint.disk(target)
        if disk is not None and disk.chain_then:
            births[checkpoint.name] = (checkpoint.created, disk.chain_then[0])
    newest = sorted(births.items(), key=lambda item: item[1][0])[-MAX_REMEMBERED:]
    return dict(sorted(newest))


def chain_then(
    checkpoint: Checkpoint,
    disk: CheckpointDisk,
    births: Births,
    filled: Mapping[str, Filled] | None = None,
) -> tuple[str, ...] | None:
    """The disk's chain when the checkpoint was taken, top (the layer its bitmap was born in)
    first, as far as anything proves it; None when nothing does.  A bitmap virt-bitmapd filled
    since begins where it was filled (``filling``)."""
    fill = (filled or {}).get(disk.bitmap)
    if fill is not None and fill.checkpoint_created == checkpoint.created:
        return fill.chain
    if disk.chain_then:
        return disk.chain_then
    known = births.get(checkpoint.name)
    if known is None or known[0] != checkpoint.created:
        return None
    return (known[1],)
