"""The control socket: ``virt-bitmapd check`` asks the daemon to look at a domain now.

A Unix socket in the daemon's runtime directory (systemd's ``RuntimeDirectory``), mode 0600,
and only a peer running as root (or as the daemon's own user) is answered: a look takes the
images' locks and may fill bitmaps, so it is not for anyone on the host.  One request per
connection, one JSON line each way:

    {"look": "DOMAIN", "timeout": SECONDS}   ->   {"looked": ["vda", ...]}
                                              or  {"error": "why"}

The answer is sent once every look asked for (and any that was running) has ended, so what
the caller reads afterwards is what that look left.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import stat
import struct
from collections.abc import Awaitable, Callable

import structlog

from ..control_client import MAX_TIMEOUT, REQUEST_LIMIT, LookFailed

__all__ = ["ControlServer"]

log = structlog.get_logger()

REQUEST_WAIT = 10.0  # seconds a caller has to send its request

#: (domain name, timeout) -> the disk targets looked at
LookNow = Callable[[str, float], Awaitable[list[str]]]


def _peer_uid(writer: asyncio.StreamWriter) -> int | None:
    sock = writer.get_extra_info("socket")
    if sock is None:
        return None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    _pid, uid, _gid = struct.unpack("3i", raw)
    return int(uid)


class ControlServer:
    def __init__(self, path: str, look_now: LookNow) -> None:
        self._path = path
        self._look_now = look_now
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        """Listen; a failure is logged and leaves ``check`` to judge without the daemon."""
        try:
            self._remove_stale()
            self._server = await asyncio.start_unix_server(
                self._serve, path=self._path, limit=REQUEST_LIMIT
            )
            os.chmod(self._path, 0o600)
        except OSError as error:
            log.error("control_socket_unavailable", path=self._path, error=str(error))
            return
        log.info("control_socket_listening", path=self._path)

    async def close(self) -> None:
        if self._server is None:
            return
        self._server.close()
        with contextlib.suppress(OSError):
            os.unlink(self._path)
        self._server = None

    def _remove_stale(self) -> None:
        """A socket left by an earlier run goes; anything else there is not ours to remove."""
        os.makedirs(os.path.dirname(self._path), mode=0o700, exist_ok=True)
        try:
            found = os.lstat(self._path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(found.st_mode):
            raise OSError(f"{self._path} exists and is not a socket")
        os.unlink(self._path)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            # the request is read first, whoever sends it: closing on unread bytes would
            # break the caller's pipe before it could read why
            try:
                line: bytes | None = await asyncio.wait_for(reader.readline(), REQUEST_WAIT)
            except (ValueError, TimeoutError):  # longer than a request may be, or none came
                line = None
            if _peer_uid(writer) not in (0, os.geteuid()):
                answer: dict[str, object] = {"error": "only root may ask for a look"}
            else:
                answer = await self._answer(line)
            writer.write(json.dumps(answer).encode() + b"\n")
            await writer.drain()
        except OSError:
            pass  # the caller went away: nothing to answer
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _answer(self, line: bytes | None) -> dict[str, object]:
        try:
            if line is None:
                raise ValueError
            request = json.loads(line)
            name = request["look"]
            timeout = float(request.get("timeout", 30.0))
            if not isinstance(name, str) or not 0 < timeout <= MAX_TIMEOUT:
                raise ValueError
        except (ValueError, TypeError, KeyError):
            return {"error": 'expected one line: {"look": "DOMAIN", "timeout": SECONDS}'}
        try:
            looked = await self._look_now(name, timeout)
        except LookFailed as error:
            return {"error": str(error)}
        return {"looked": looked}
