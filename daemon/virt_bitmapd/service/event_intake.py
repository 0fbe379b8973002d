"""libvirt's events, turned into looks to take.  Runs on the loop (``libvirt_events`` hands
the callbacks over); what an event means is a pure table.

* Block job events (BLOCK_JOB_2): every one is logged and counted.  A COMPLETED commit or active
  commit asks for a look at that disk, and so does a COMPLETED copy (a pivot onto a copy of the
  top, which libvirt gives the top's bitmaps: what checkpoint health must know).  libvirt
  sends no event for a snapshot, so a layer made since the last look is unknown; an active
  commit waits at READY with its whole chain still in place, so READY asks for a look too,
  which remembers that chain (a layer made just before is then known to be part of the commit
  when it completes).  Nothing else changes anything.
* Lifecycle events: an undefined domain is forgotten (a renamed one keeps its chains, only its
  series under the old name go); a domain defined, started or stopped is looked at again.  Not
  at SHUTDOWN: QEMU still holds the images then; STOPPED follows once it has exited.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any

import libvirt
import structlog

from ..block_jobs import job_name
from ..observability.metrics import Metrics
from .disk_memory import DiskKey
from .scheduler import BlockJob, LookRequest

__all__ = ["Action", "EventIntake", "block_job_action"]

log = structlog.get_logger()

JOB_STATUSES = {
    libvirt.VIR_DOMAIN_BLOCK_JOB_COMPLETED: "completed",
    libvirt.VIR_DOMAIN_BLOCK_JOB_FAILED: "failed",
    libvirt.VIR_DOMAIN_BLOCK_JOB_CANCELED: "canceled",
    libvirt.VIR_DOMAIN_BLOCK_JOB_READY: "ready",
}
LOOK_AGAIN = (
    libvirt.VIR_DOMAIN_EVENT_DEFINED,
    libvirt.VIR_DOMAIN_EVENT_STARTED,
    libvirt.VIR_DOMAIN_EVENT_STOPPED,
)


class Action(enum.Enum):
    """What a block job event asks for; the value is what the log says."""

    LOOK = "look at the disk"
    #: an active commit at READY: its whole chain is still in place, and a look now knows
    #: every layer the commit will take (it may also find the pivot done already)
    LOOK_BEFORE_PIVOT = "look at the disk before the pivot"
    NONE = "none"


_ACTIONS = {
    ("copy", "completed"): Action.LOOK,
    ("commit", "completed"): Action.LOOK,
    ("active_commit", "completed"): Action.LOOK,
    ("active_commit", "ready"): Action.LOOK_BEFORE_PIVOT,
}


def block_job_action(job_type: str, status: str) -> Action:
    return _ACTIONS.get((job_type, status), Action.NONE)


class EventIntake:
    def __init__(
        self,
        metrics: Metrics,
        *,
        look: Callable[[DiskKey, LookRequest], object],
        forget: Callable[[str, str], None],
        rescan: Callable[[Any], None],
    ) -> None:
        """``look(key, request)`` asks for a look at a disk, ``forget(uuid, name)`` forgets an
        undefined domain, ``rescan(dom)`` looks at all of a domain's disks."""
        self._metrics = metrics
        self._look = look
        self._forget = forget
        self._rescan = rescan

    def block_job(
        self, _conn: Any, dom: Any, disk: str, job_type: int, status: int, _opaque: Any
    ) -> None:
        type_name = job_name(job_type)
        status_name = JOB_STATUSES.get(status, f"unknown_{status}")
        self._metrics.block_job_events.labels(type_name, status_name).inc()
        action = block_job_action(type_name, status_name)
        log.info(
            "block_job_event",
            domain=dom.name(),
            disk=disk,
            job_type=type_name,
            status=status_name,
            action=action.value,
        )
        if action is not Action.NONE:
            job = BlockJob(type_name, completed=action is Action.LOOK)
            self._look((dom.UUIDString(), disk), LookRequest.because("event", job))

    def lifecycle(self, _conn: Any, dom: Any, event: int, detail: int, _opaque: Any) -> None:
        if event == libvirt.VIR_DOMAIN_EVENT_UNDEFINED:
            if detail == libvirt.VIR_DOMAIN_EVENT_UNDEFINED_RENAMED:
                self._metrics.forget_domain(dom.name())
            else:
                self._forget(dom.UUIDString(), dom.name())
        elif event in LOOK_AGAIN:
            self._rescan(dom)
