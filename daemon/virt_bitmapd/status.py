"""``virt-bitmapd status``: every checkpoint of every disk, judged as the daemon judges it.

It reads libvirt (domains, checkpoints; QEMU's node data through the monitor for running
domains, by queries only), the image headers of shut-off domains (sharing their locks, so a
disk in use elsewhere is read too), and the daemon's memory of untrusted bitmaps from its state
directory.  It never writes anything, and works whether the daemon runs or not.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import libvirt

from .births import births_now
from .errors import LibvirtFailed, VirtBitmapdError
from .filling import fills_now
from .health import CheckpointHealth
from .look.judge import Evidence, distrust, judge
from .readers.chain import current_chain, domain_disks, resolved
from .readers.checkpoints import domain_checkpoints
from .state import StateStore

__all__ = ["DiskStatus", "DomainStatus", "HostStatus", "host_status"]


@dataclass(frozen=True, slots=True, kw_only=True)
class DiskStatus:
    disk: str
    chain: tuple[str, ...] = ()
    checkpoints: tuple[CheckpointHealth, ...] = ()
    #: Why the disk could not be judged (then ``checkpoints`` is empty).
    error: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class DomainStatus:
    name: str
    uuid: str
    running: bool
    disks: tuple[DiskStatus, ...] = ()
    #: The checkpoints' names, oldest first (by creation time).
    checkpoints: tuple[str, ...] = ()
    #: Disks that hold no checkpoints (raw, network), with the reason.
    skipped: tuple[tuple[str, str], ...] = ()
    error: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class HostStatus:
    domains: tuple[DomainStatus, ...] = ()
    #: Why the daemon's memory could not be read, when it could not: bitmaps it distrusts are
    #: then not shown as untrusted.
    memory_error: str | None = None
    notes: tuple[str, ...] = field(default=())

    @property
    def complete(self) -> bool:
        """Whether every disk could be judged."""
        return self.memory_error is None and not any(
            domain.error or any(disk.error for disk in domain.disks) for domain in self.domains
        )


def host_status(uri: str, state_dir: str, only: str | None = None) -> HostStatus:
    """Raises LibvirtFailed when libvirt cannot be reached or ``only`` names no domain."""
    libvirt.registerErrorHandler(_unprinted, None)
    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError as error:
        raise LibvirtFailed(f"{uri}: cannot connect: {error}") from error
    try:
        if only is not None:
            try:
                chosen = [conn.lookupByName(only)]
            except libvirt.libvirtError as error:
                raise LibvirtFailed(f"{only}: no such domain: {error}") from error
        else:
            chosen = sorted(conn.listAllDomains(0), key=lambda d: d.name())
        store = StateStore(state_dir, read_only=True)
        memory_error = _memory_problem(state_dir)
        return HostStatus(
            domains=tuple(_domain_status(domain, store) for domain in chosen),
            memory_error=memory_error,
        )
    finally:
        conn.close()


def _unprinted(_context: object, _error: object) -> None:
    """libvirt-python prints every error to stderr by default; each also comes back as an
    exception, which the command reports in its own words (once)."""


def _memory_problem(state_dir: str) -> str | None:
    directory = os.path.join(state_dir, "domains")
    if os.path.isdir(directory) and not os.access(directory, os.R_OK | os.X_OK):
        return f"{directory}: cannot be read (run as root)"
    return None


def _domain_status(domain: libvirt.virDomain, store: StateStore) -> DomainStatus:
    try:
        name, uuid, running = domain.name(), domain.UUIDString(), bool(domain.isActive())
    except libvirt.libvirtError as error:
        return DomainStatus(name="?", uuid="?", running=False, error=str(error))
    try:
        disks = domain_disks(domain)
        checkpoints = domain_checkpoints(domain)
        state = store.load(uuid)
    except VirtBitmapdError as error:
        return DomainStatus(name=name, uuid=uuid, running=running, error=str(error))
    judged = []
    for disk in disks.disks:
        try:
            now = current_chain(domain, resolved(disk), running, force_share=True)
            chain = now.images
        except VirtBitmapdError as error:
            judged.append(DiskStatus(disk=disk.target, error=str(error)))
            continue
        merged = {} if state is None else state.merged_into.get(disk.target, {})
        births = births_now(
            checkpoints, disk.target, {} if state is None else state.births.get(disk.target, {})
        )
        filled = fills_now(
            {} if state is None else state.filled.get(disk.target, {}),
            chain,
            checkpoints,
            disk.target,
        )
        evidence = Evidence(
            target=disk.target,
            checkpoints=checkpoints,
            merged_into=merged,
            births=births,
            filled=filled,
        )
        untrusted = distrust(
            chain,
            evidence,
            remembered={} if state is None else state.untrusted.get(disk.target, {}),
            after_commits={},
            job=now.job,
        )
        judged.append(
            DiskStatus(
                disk=disk.target,
                chain=tuple(image.path for image in chain),
                checkpoints=judge(
                    chain,
                    evidence,
                    untrusted,
                    job=now.job,
                    united=state is not None and state.united.get(disk.target) == now.paths,
                ),
            )
        )
    return DomainStatus(
        name=name,
        uuid=uuid,
        running=running,
        disks=tuple(judged),
        checkpoints=tuple(checkpoint.name for checkpoint in checkpoints),
        skipped=tuple((skip.target, skip.reason) for skip in disks.skipped),
    )
