"""Remove what an interrupted run left inside running QEMUs: jobs, nodes and probe bitmaps of
ours.

Blocking code, run off the event loop when the daemon (re)connects, before it looks at any disk,
so nothing of its own is in flight.  Only names under our prefixes are touched (``vbd-`` jobs
and nodes, ``vbd-probe-`` bitmaps), never libvirt's, and only in domains with a qcow2 disk (the
only ones the daemon ever attached anything to).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import libvirt

from ..errors import VirtBitmapdError
from ..qmp import OWN_PREFIX, blockdev_del, remove_bitmaps
from ..qmp_nodes import leftovers, query_nodes
from ..readers.chain import domain_disks
from ..transports.libvirt_monitor import LibvirtMonitor

__all__ = ["Removed", "remove_leftovers"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Removed:
    domain: str
    jobs: tuple[str, ...] = ()
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
            jobs = [
                job["id"]
                for job in monitor.execute({"execute": "query-jobs"})
                if str(job.get("id", "")).startswith(OWN_PREFIX)
            ]
            found = leftovers(monitor.execute(query_nodes()))
            name = domain.name()
        except (libvirt.libvirtError, VirtBitmapdError):
            continue  # stopped meanwhile, or QEMU busy: the next connection looks again
        if not jobs and not found.nodes and not found.bitmaps:
            continue
        failures = [f"job {job}: {why}" for job in jobs if (why := _end_job(monitor, job))]
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
                jobs=tuple(jobs),
                nodes=found.nodes,
                bitmaps=tuple(f"{node}/{bitmap}" for node, bitmap in found.bitmaps),
                failures=tuple(failures),
            )
        )
    return results


#: Seconds a cancelled job of ours (a fill's copy, which reads and writes nothing) may take to
#: conclude before it is left to the next connection.
JOB_END_WAIT = 10.0


def _end_job(monitor: LibvirtMonitor, job: str) -> str | None:
    """Cancel job ``job`` and dismiss it once it concluded; why not, if it could not be."""
    deadline = time.monotonic() + JOB_END_WAIT
    try:
        while True:
            status = next(
                (j["status"] for j in monitor.execute({"execute": "query-jobs"}) if j["id"] == job),
                None,
            )
            if status is None:
                return None
            if status == "concluded":
                monitor.execute({"execute": "job-dismiss", "arguments": {"id": job}})
                return None
            if time.monotonic() > deadline:
                return f"still {status} after {JOB_END_WAIT:.0f} s"
            if status not in ("aborting", "undefined"):
                monitor.execute({"execute": "job-cancel", "arguments": {"id": job}})
            time.sleep(0.1)
    except VirtBitmapdError as error:
        return str(error)
