"""A disk's chain as it is now: live from libvirt's XML and QEMU's node data, at rest from the
image headers.  Blocking I/O, run off the event loop.

While QEMU runs, the on-disk bitmap flags are stale, so a running disk's bitmaps come from QEMU
through libvirt's monitor passthrough; the chain is read until the XML is the same before and
after (a pivot can move it in between), and whether a block job was running meanwhile is kept:
then the bitmaps may be caught half-way through the job's own bitmap handling.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import libvirt

from .. import images
from ..block_jobs import job_name
from ..domain_xml import Disk, DomainDisks, parse_domain
from ..errors import ChainError, ChainMoving, ImageUnreadable, LibvirtFailed
from ..model import Image
from ..qmp_nodes import node_bitmaps, query_nodes
from ..transports.libvirt_monitor import LibvirtMonitor

__all__ = ["ChainNow", "current_chain", "domain_disks", "resolved"]

READ_ATTEMPTS = 3


@dataclass(frozen=True, slots=True, kw_only=True)
class ChainNow:
    #: The disk as libvirt shows it, paths with symlinks resolved.
    disk: Disk
    paths: tuple[str, ...]
    #: Each layer with its bitmaps as they really are now.
    images: tuple[Image, ...]
    #: The block job that ran on the disk while it was read (its type), if one did: the
    #: bitmaps may be caught half-way through the job's own bitmap handling.
    job: str | None = None

    @property
    def job_running(self) -> bool:
        return self.job is not None


def domain_disks(domain: libvirt.virDomain, flags: int = 0) -> DomainDisks:
    """The domain's disks from its XML; LibvirtFailed when libvirt cannot give it."""
    try:
        return parse_domain(domain.XMLDesc(flags))
    except libvirt.libvirtError as error:
        raise LibvirtFailed(f"cannot read the domain: {error}") from error


def resolved(disk: Disk) -> Disk:
    """``disk`` with every layer's path as a real path (symlinks resolved)."""
    layers = tuple(replace(layer, path=os.path.realpath(layer.path)) for layer in disk.layers)
    return replace(disk, layers=layers)


def current_chain(
    domain: libvirt.virDomain, disk: Disk, running: bool, *, force_share: bool = False
) -> ChainNow:
    """``force_share``: read images at rest even while another process holds them (a reader
    that changes nothing)."""
    if not running:
        chain = images.read_chain(
            disk.layers[0].path, formats=disk.formats, force_share=force_share
        )
        return ChainNow(disk=disk, paths=tuple(i.path for i in chain), images=chain.images)
    for _ in range(READ_ATTEMPTS):
        job = _block_job(domain, disk.target)
        nodes = LibvirtMonitor(domain).execute(query_nodes())
        job = job or _block_job(domain, disk.target)
        again = _live_disk(domain, disk.target)
        if again == disk:
            break
        disk = again  # the chain moved under us (a pivot): read it again
    else:
        raise ChainMoving(f"{disk.layers[0].path}: the chain of {disk.target} kept changing")
    layers = []
    for layer in disk.layers:
        if layer.format is None:
            raise ChainError(f"{layer.path}: libvirt names no format for this layer")
        try:
            bitmaps = node_bitmaps(nodes, str(layer.format_node)).bitmaps
        except KeyError:  # unknown is not "none": a look must not judge from it
            raise ImageUnreadable(
                layer.path,
                f"QEMU shows no node for it ({layer.format_node}): its bitmaps cannot be read",
            ) from None
        layers.append(Image(path=layer.path, format=layer.format, bitmaps=bitmaps))
    return ChainNow(disk=disk, paths=disk.paths, images=tuple(layers), job=job)


def _block_job(domain: libvirt.virDomain, target: str) -> str | None:
    try:
        info = domain.blockJobInfo(target, 0)
        return job_name(int(info["type"])) if info else None
    except libvirt.libvirtError as error:
        raise LibvirtFailed(f"cannot ask about block jobs on {target}: {error}") from error


def _live_disk(domain: libvirt.virDomain, target: str) -> Disk:
    disk = next((d for d in domain_disks(domain).disks if d.target == target), None)
    if disk is None:
        raise ChainMoving(f"disk {target} went away while it was read")
    return resolved(disk)
