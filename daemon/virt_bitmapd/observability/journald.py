"""Send entries to systemd-journald with its native protocol (no library needed).

Each entry is one datagram on journald's socket: ``FIELD=value`` lines, or, for values holding a
newline, ``FIELD``, a newline, the value's length as 64-bit little endian, the value, a newline.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Mapping

__all__ = ["DEFAULT_SOCKET", "JournalSender", "encode"]

DEFAULT_SOCKET = "/run/systemd/journal/socket"


def encode(fields: Mapping[str, str]) -> bytes:
    parts = []
    for name, value in fields.items():
        data = value.encode("utf-8", errors="replace")
        key = name.encode("ascii")
        if b"\n" in data:
            parts.append(key + b"\n" + struct.pack("<Q", len(data)) + data + b"\n")
        else:
            parts.append(key + b"=" + data + b"\n")
    return b"".join(parts)


class JournalSender:
    """One unconnected datagram socket; a send that fails is reported to the caller, never
    raised (logging must not stop the work it describes)."""

    def __init__(self, path: str = DEFAULT_SOCKET) -> None:
        self.path = path
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.last_error: OSError | None = None

    def send(self, fields: Mapping[str, str]) -> bool:
        try:
            self._socket.sendto(encode(fields), self.path)
        except OSError as error:
            self.last_error = error
            return False
        return True
