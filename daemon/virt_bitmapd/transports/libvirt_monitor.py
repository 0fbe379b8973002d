"""QMP in a running domain, through libvirt's QEMU monitor passthrough.

libvirt marks a domain "custom-monitor" tainted the first time this is used on it; that is a
note in its log, nothing more.  Node names we create start with ``vbd-`` so they never collide
with libvirt's ``libvirt-N-*``.
"""

from __future__ import annotations

import json
from typing import Any

import libvirt
import libvirt_qemu

from ..errors import LibvirtFailed, QMPError

__all__ = ["LibvirtMonitor"]


class LibvirtMonitor:
    def __init__(self, domain: libvirt.virDomain) -> None:
        self._domain = domain

    def execute(self, command: dict[str, Any]) -> Any:
        name = str(command.get("execute"))
        try:
            reply = libvirt_qemu.qemuMonitorCommand(self._domain, json.dumps(command), 0)
        except libvirt.libvirtError as error:
            raise LibvirtFailed(f"{self._domain.name()}: QMP {name}: {error}") from error
        message = json.loads(reply)
        if "error" in message:
            failure = message["error"]
            raise QMPError(name, str(failure.get("desc")))
        return message.get("return")
