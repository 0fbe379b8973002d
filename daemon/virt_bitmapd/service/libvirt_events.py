"""libvirt's own event loop, in a thread of its own, handing events to asyncio.

Why not libvirtaio: libvirt calls its event implementation from whichever thread makes a call
(every RPC updates the connection's socket watch, keepalives add and remove timers).  libvirtaio
then calls asyncio's loop methods from that thread, which asyncio does not allow ("Non-thread-safe
operation invoked on an event loop other than the current one").  The daemon must call libvirt
off the loop: RPCs block, and a monitor command can take seconds.  Confining every libvirt call
to the loop's thread instead would stall the loop (and its watchdog pings) for as long as a slow
libvirtd takes to answer.

So libvirt's default implementation, which is thread-safe, runs in one dedicated thread.  Event
callbacks run there and do nothing but hand their arguments to the asyncio loop with
``call_soon_threadsafe``; everything else happens on the loop.  libvirt calls are made from
worker threads (``asyncio.to_thread``), which the default implementation allows.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

import libvirt
import structlog

__all__ = ["LibvirtEventThread", "in_loop", "route_libvirt_errors"]

log = structlog.get_logger()

_registration_lock = threading.Lock()
_registered: list[bool] = []  # one element once libvirt has its event implementation


def route_libvirt_errors() -> None:
    """libvirt-python prints every error it raises to stderr ("libvirt: ... error : ...") by
    default, which breaks JSON output.  Send them through the daemon's own logging instead:
    libvirt's warnings as warnings; its errors at debug level, since each also comes back as an
    exception that the code which made the call reports in its own words."""
    libvirt.registerErrorHandler(_log_libvirt_error, None)


def _log_libvirt_error(_context: Any, error: Any) -> None:
    code, domain, message, level = (list(error) + [None] * 4)[:4]
    fields = {"code": code, "libvirt_domain": domain, "message": str(message).strip()}
    if level == libvirt.VIR_ERR_WARNING:
        log.warning("libvirt_warning", **fields)
    else:
        log.debug("libvirt_error", libvirt_level="error", **fields)


class LibvirtEventThread:
    """Runs ``virEventRunDefaultImpl`` until stopped.  Start it before the first connection is
    opened; libvirt allows one event implementation per process, registered once."""

    def __init__(self) -> None:
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        with _registration_lock:
            if not _registered:
                libvirt.virEventRegisterDefaultImpl()
                _registered.append(True)
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="libvirt-events", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopping.is_set():
            if libvirt.virEventRunDefaultImpl() < 0:
                break

    def stop(self, timeout: float = 2.0) -> None:
        """Ask the thread to end and wake it with a timer that fires at once."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._stopping.set()
        timer = libvirt.virEventAddTimeout(0, _remove_timer, None)
        thread.join(timeout)
        if thread.is_alive():  # a daemon thread: it ends with the process
            libvirt.virEventRemoveTimeout(timer)


def _remove_timer(timer: int, _opaque: Any) -> None:
    libvirt.virEventRemoveTimeout(timer)


def in_loop(loop: asyncio.AbstractEventLoop, handler: Callable[..., None]) -> Callable[..., None]:
    """A libvirt callback that runs ``handler`` with the same arguments on ``loop``'s thread."""

    def callback(*args: Any) -> None:
        if not loop.is_closed():
            loop.call_soon_threadsafe(handler, *args)

    return callback
