"""A domain's libvirt checkpoints as they are now.  Blocking I/O, run off the event loop.

Paths in a checkpoint's chain are resolved like the chains they are compared with.  A checkpoint
deleted while the list is read is simply left out.
"""

from __future__ import annotations

import os
from dataclasses import replace

import libvirt

from ..checkpoint_xml import Checkpoint, parse_checkpoint, sorted_names
from ..errors import LibvirtFailed

__all__ = ["checkpoint_names", "domain_checkpoints"]


def checkpoint_names(domain: libvirt.virDomain) -> tuple[str, ...]:
    """The domain's checkpoint names, sorted: one call to libvirt, no XML."""
    try:
        return sorted_names(item.getName() for item in domain.listAllCheckpoints(0))
    except libvirt.libvirtError as error:
        raise LibvirtFailed(f"cannot list the checkpoints: {error}") from error


def domain_checkpoints(domain: libvirt.virDomain) -> tuple[Checkpoint, ...]:
    """Raises LibvirtFailed when libvirt cannot list them, DomainXMLInvalid on XML that is not
    a checkpoint."""
    try:
        found = domain.listAllCheckpoints(0)
    except libvirt.libvirtError as error:
        raise LibvirtFailed(f"cannot list the checkpoints: {error}") from error
    checkpoints = []
    for item in found:
        try:
            xml = item.getXMLDesc(0)
        except libvirt.libvirtError as error:
            if error.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_CHECKPOINT:
                continue
            raise LibvirtFailed(f"cannot read checkpoint {item.getName()}: {error}") from error
        checkpoints.append(_resolved(parse_checkpoint(xml)))
    return tuple(sorted(checkpoints, key=lambda checkpoint: (checkpoint.created, checkpoint.name)))


def _resolved(checkpoint: Checkpoint) -> Checkpoint:
    disks = tuple(
        replace(disk, chain_then=tuple(os.path.realpath(path) for path in disk.chain_then))
        for disk in checkpoint.disks
    )
    return replace(checkpoint, disks=disks)
