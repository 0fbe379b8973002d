"""Remove what an interrupted run left inside running QEMUs: nodes and probe bitmaps of ours.

Blocking code, run off the event loop when the daemon (re)connects, before it looks at any disk,
so nothing of its own is in flight.  Only names under our prefixes are touched (``vbd-`` nodes,
``vbd-probe-`` bitmaps), never libvirt's, and only in domains with a qcow2 disk (the only ones
the daemon ever attached anything to).
"""

from __future__ import annotations

from dataclasses import dataclass

import libvirt

from ..errors import VirtBitmapdError
from ..qmp import blockdev_del, leftovers, query_nodes, remove_bitmaps
from ..readers.chain import domain_disks
from ..transports.libvirt_monitor import LibvirtMonitor

__all__ = ["Removed", "remove_leftovers"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Removed:
    domain: str
    nodes: tuple[str, ...] = ()
    bitmaps: tuple[str, ...] = ()
    #: What could not be removed (the next connection tries again).
    failures: tuple[str, ...] = ()


def remove_leftovers(conn: libvirt.virConnect) -> list[Removed]:
    """Per running domain that had any: what was removed, and what could not be."""
    try:
        running = conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)
    except libvirt.libvirtError:
        return []  # the connection's own handling reports a dead libvirtd
    results = []
    for domain in running:
        try:
            if not domain_disks(domain).disks:
                continue
            monitor = LibvirtMonitor(domain)
            found = leftovers(monitor.execute(query_nodes()))
            name = domain.name()
        except (libvirt.libvirtError, VirtBitmapdError):
            continue  # stopped meanwhile, or QEMU busy: the next connection looks again
        if not found.nodes and not found.bitmaps:
            continue
        failures = []
        by_node: dict[str, list[str]] = {}
        for node, bitmap in found.bitmaps:
            by_node.setdefault(node, []).append(bitmap)
        for node, names in by_node.items():
            try:
                monitor.execute(remove_bitmaps(node, names))
            except VirtBitmapdError as error:
                failures.append(f"bitmaps {names} on {node}: {error}")
        for node in found.nodes:
            try:
                monitor.execute(blockdev_del(node))
            except VirtBitmapdError as error:
                failures.append(f"node {node}: {error}")
        results.append(
            Removed(
                domain=name,
                nodes=found.nodes,
                bitmaps=tuple(f"{node}/{bitmap}" for node, bitmap in found.bitmaps),
                failures=tuple(failures),
            )
        )
    return results
