"""What every domain of the host uses as a disk, live and at its next boot.  Blocking I/O.

A file some domain uses as a raw disk holds its guest's bytes: a qcow2 header found there is
believed by nobody.  Every layer of every qcow2 chain is in use: a file beside a chain that is
in none of them may be a layer a commit took away.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import libvirt

from .. import images
from ..domain_xml import parse_domain
from ..errors import LibvirtFailed, VirtBitmapdError
from ..model import QCOW2

__all__ = ["HostDisks", "host_disks"]

MAX_DEPTH = 64


@dataclass(frozen=True, slots=True)
class HostDisks:
    #: Files any domain uses as a disk in a format other than qcow2.
    raw_files: frozenset[str]
    #: Every layer of every domain's qcow2 chains (libvirt's XML, then the headers below).
    chain_files: frozenset[str]


def host_disks(conn: libvirt.virConnect) -> HostDisks:
    try:
        documents = []
        for other in conn.listAllDomains(0):
            documents.append(other.XMLDesc(0))
            if other.isActive() and other.isPersistent():  # the next boot's disks too
                documents.append(other.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
    except libvirt.libvirtError as error:
        raise LibvirtFailed(f"cannot list the host's disks: {error}") from error
    raw: set[str] = set()
    chains: set[str] = set()
    for document in documents:
        disks = parse_domain(document)
        raw.update(os.path.realpath(path) for path in disks.raw_files)
        for disk in disks.disks:
            chains.update(os.path.realpath(path) for path in disk.paths)
            chains.update(_layers_below(os.path.realpath(disk.paths[-1])))
    return HostDisks(raw_files=frozenset(raw), chain_files=frozenset(chains))


def _layers_below(path: str) -> list[str]:
    """The backing files named by qcow2 headers from ``path`` down (headers only, no QEMU)."""
    below: list[str] = []
    while len(below) < MAX_DEPTH:
        try:
            header = images.read_header(path)
        except VirtBitmapdError:
            break
        if header.backing_name is None:
            break
        path = images.backing_path(path, header.backing_name)
        below.append(path)
        if header.backing_format != QCOW2:
            break
    return below
