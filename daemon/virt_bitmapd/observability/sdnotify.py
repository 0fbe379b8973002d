"""systemd's notify protocol (READY, STATUS, WATCHDOG, STOPPING) without a library.

A datagram of ``KEY=value`` lines to the socket named by $NOTIFY_SOCKET (``@name`` is an
abstract socket).  Outside systemd the variable is unset and every call does nothing.
"""

from __future__ import annotations

import os
import socket

__all__ = ["Notifier"]


class Notifier:
    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = dict(os.environ if environ is None else environ)
        self._address = env.get("NOTIFY_SOCKET") or None
        if self._address and self._address.startswith("@"):
            self._address = "\0" + self._address[1:]
        self._watchdog_usec = 0
        pid = env.get("WATCHDOG_PID")
        usec = env.get("WATCHDOG_USEC", "")
        if usec.isdigit() and (pid is None or pid == str(os.getpid())):
            self._watchdog_usec = int(usec)

    @property
    def watchdog_interval(self) -> float | None:
        """How often to ping: half the watchdog timeout, or None when there is no watchdog."""
        return self._watchdog_usec / 2_000_000 if self._watchdog_usec else None

    def send(self, *lines: str) -> bool:
        if self._address is None:
            return False
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            try:
                sock.sendto("\n".join(lines).encode(), self._address)
            except OSError:
                return False
        return True

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        self.send(f"STATUS={status}")

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")

    def stopping(self) -> None:
        self.send("STOPPING=1", "STATUS=stopping")
