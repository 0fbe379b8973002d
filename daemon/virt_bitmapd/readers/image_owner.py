"""Which domain's disk an image is the top of.  Blocking I/O: libvirt's domain list and XML."""

from __future__ import annotations

import os

import libvirt

from ..domain_xml import Disk
from ..errors import LibvirtFailed
from .chain import domain_disks, resolved

__all__ = ["disk_topped_by"]


def disk_topped_by(conn: libvirt.virConnect, image: str) -> tuple[libvirt.virDomain, Disk] | None:
    """The domain and disk (paths resolved) whose active layer ``image`` is, or None."""
    wanted = os.path.realpath(image)
    try:
        domains = conn.listAllDomains(0)
    except libvirt.libvirtError as error:
        raise LibvirtFailed(f"cannot list the domains: {error}") from error
    for domain in domains:
        try:
            disks = domain_disks(domain).disks
        except LibvirtFailed:
            continue  # undefined meanwhile
        for disk in disks:
            if resolved(disk).paths[0] == wanted:
                return domain, resolved(disk)
    return None
