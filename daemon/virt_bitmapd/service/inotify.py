"""Linux inotify, straight over the kernel API: which names changed in which directories.

Why not a library: the Debian package depends on Debian's own packages only, and Debian 12 has
no maintained inotify library for asyncio (python3-pyinotify is built on asyncore, which Python
3.12 removed). The kernel API is three calls and one record format; the descriptor is
non-blocking, so the event loop reads it when it is readable (``loop.add_reader``).
"""

from __future__ import annotations

import ctypes
import errno as errno_codes
import os
import struct
from dataclasses import dataclass

__all__ = [
    "IN_ATTRIB",
    "IN_CLOSE_WRITE",
    "IN_CREATE",
    "IN_DELETE",
    "IN_IGNORED",
    "IN_MOVED_FROM",
    "IN_MOVED_TO",
    "IN_Q_OVERFLOW",
    "Event",
    "Inotify",
    "parse_events",
]

IN_ATTRIB = 0x00000004
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC

_HEADER = struct.Struct("=iIII")  # wd, mask, cookie, len (then len bytes of NUL-padded name)
_READ_SIZE = 64 * 1024


@dataclass(frozen=True, slots=True)
class Event:
    wd: int
    mask: int
    name: str  # "" for an event on the watched directory itself


def parse_events(data: bytes) -> list[Event]:
    """The records of one ``read`` of an inotify descriptor."""
    events = []
    offset = 0
    while offset + _HEADER.size <= len(data):
        wd, mask, _cookie, length = _HEADER.unpack_from(data, offset)
        offset += _HEADER.size
        raw = data[offset : offset + length].split(b"\0", 1)[0]
        offset += length
        events.append(Event(wd, mask, os.fsdecode(raw)))
    return events


class Inotify:
    """One inotify instance. Not thread-safe: used from the event loop's thread only."""

    def __init__(self) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        fd = self._libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            raise _os_error("inotify_init1")
        self._fd: int = fd

    def fileno(self) -> int:
        return self._fd

    def add(self, directory: str, mask: int) -> int:
        """Watch ``directory`` (a directory only: a symlink or file there is refused)."""
        wd = self._libc.inotify_add_watch(self._fd, os.fsencode(directory), mask | IN_ONLYDIR)
        if wd < 0:
            raise _os_error(directory)
        return int(wd)

    def remove(self, wd: int) -> None:
        self._libc.inotify_rm_watch(self._fd, wd)  # gone already (IN_IGNORED): nothing to do

    def read(self) -> list[Event]:
        try:
            return parse_events(os.read(self._fd, _READ_SIZE))
        except BlockingIOError:
            return []

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _os_error(what: str) -> OSError:
    code = ctypes.get_errno() or errno_codes.EIO
    return OSError(code, os.strerror(code), what)
