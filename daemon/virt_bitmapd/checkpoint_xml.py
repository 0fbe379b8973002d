"""libvirt checkpoints from their XML (``virsh checkpoint-dumpxml``).  Pure.

A checkpoint names, per disk, the bitmap that records changes since it was taken.  Its XML also
embeds the domain as it was then, so it tells which layer was the disk's active layer when the
checkpoint was taken (the layer libvirt created the bitmap in) and, for a running domain, the
whole chain below it.  That is what proves a checkpoint's bits complete or not after layers went
away (see ``health``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from .domain_xml import disks_of_element, libvirt_root
from .errors import DomainXMLInvalid

__all__ = ["Checkpoint", "CheckpointDisk", "names_of", "parse_checkpoint", "sorted_names"]


@dataclass(frozen=True, slots=True, kw_only=True)
class CheckpointDisk:
    """One disk of a checkpoint: its bitmap and the disk's chain when the checkpoint was taken."""

    target: str
    bitmap: str
    #: The chain then, top (the active layer then) first; may be only the top.
    chain_then: tuple[str, ...] = ()
    #: Whether ``chain_then`` goes to the end of the chain (libvirt listed it whole).
    chain_then_complete: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class Checkpoint:
    name: str
    #: libvirt's <creationTime> (Unix seconds); 0 when absent.
    created: int = 0
    #: Disks with a bitmap (checkpoint='bitmap'); disks left out of the checkpoint are absent.
    disks: tuple[CheckpointDisk, ...] = field(default=())

    def disk(self, target: str) -> CheckpointDisk | None:
        return next((disk for disk in self.disks if disk.target == target), None)


def parse_checkpoint(xml: str) -> Checkpoint:
    """Raises DomainXMLInvalid when ``xml`` is not a checkpoint description."""
    root = libvirt_root(xml, "domaincheckpoint", "checkpoint")
    name = root.findtext("name", default="")
    if not name:
        raise DomainXMLInvalid("the checkpoint XML names no checkpoint")
    created_text = root.findtext("creationTime", default="0").strip()
    created = int(created_text) if created_text.isdigit() else 0
    then = {}
    domain = root.find("domain")
    if domain is not None:
        for disk in disks_of_element(domain).disks:
            then[disk.target] = (disk.paths, disk.complete)
    disks = []
    for element in root.findall("./disks/disk"):
        target = element.get("name", "")
        if element.get("checkpoint", "bitmap") != "bitmap" or not target:
            continue
        chain, complete = then.get(target, ((), False))
        disks.append(
            CheckpointDisk(
                target=target,
                bitmap=element.get("bitmap") or name,
                chain_then=chain,
                chain_then_complete=complete,
            )
        )
    return Checkpoint(name=name, created=created, disks=tuple(disks))


def sorted_names(names: Iterable[str]) -> tuple[str, ...]:
    """Checkpoint names in the one order every comparison of them uses (``Fingerprint`` keeps them
    so), whether they came from libvirt's list or from the checkpoints' XML."""
    return tuple(sorted(names))


def bitmap_created(checkpoints: Iterable[Checkpoint], target: str) -> dict[str, int]:
    """Each bitmap a checkpoint names for disk ``target`` -> that checkpoint's creationTime:
    which checkpoint of that name it is (one taken again under the name is another)."""
    return {
        disk.bitmap: checkpoint.created
        for checkpoint in checkpoints
        if (disk := checkpoint.disk(target)) is not None
    }


def names_of(checkpoints: Iterable[Checkpoint]) -> tuple[str, ...]:
    return sorted_names(checkpoint.name for checkpoint in checkpoints)
