"""Errors of the tools, services and files around the images: QEMU's tools and monitor,
libvirtd, the state directory."""

from __future__ import annotations

from .base import VirtBitmapdError


class CleanupFailed(VirtBitmapdError):
    """Temporary nodes or probe bitmaps could not be removed from a running QEMU (or its base
    put back read-only); the daemon removes its leftovers when it next connects."""

    kind = "cleanup_failed"
    retryable = True

    def __init__(self, domain: str, failures: list[str]) -> None:
        super().__init__(f"{domain}: cleanup after the check failed: {'; '.join(failures)}")
        self.failures = tuple(failures)


class ToolFailed(VirtBitmapdError):
    """A QEMU tool could not be run or did not answer as expected.  A tool that is missing will
    still be missing later; one that timed out or died may do better next time."""

    kind = "tool_failed"

    def __init__(self, message: str, *, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


class ToolCrashed(ToolFailed):
    """A QEMU tool ended by a signal (an abort, a kill) in the middle of its work."""

    kind = "tool_crashed"


class QMPError(VirtBitmapdError):
    """QEMU answered a QMP command with an error."""

    kind = "qmp_error"

    def __init__(self, command: str, description: str) -> None:
        super().__init__(f"{command}: {description}")
        self.command = command
        self.description = description


class LibvirtFailed(VirtBitmapdError):
    """libvirtd refused a call or went away; the next look may succeed."""

    kind = "libvirt_failed"
    retryable = True


class DomainXMLInvalid(VirtBitmapdError):
    """libvirt answered with XML that is not a domain description."""

    kind = "domain_xml_invalid"


class StateUnusable(VirtBitmapdError):
    """The state directory cannot be read or written."""

    kind = "state_unusable"
    retryable = True
