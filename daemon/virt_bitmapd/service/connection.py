"""The connection to libvirtd: open, register callbacks, keep alive, notice loss, reopen.

libvirt's events arrive on its own event thread (``libvirt_events``) and are handed to the
asyncio loop; every libvirt call here runs in a worker thread, never on the loop.  When
libvirtd goes away (keepalive or close callback), the connection is closed and opened again with
capped exponential backoff; each new connection registers the callbacks again and is handed to
``on_connected``, which rescans.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

import libvirt
import structlog

from ..observability.metrics import Metrics
from ..observability.sdnotify import Notifier
from .libvirt_events import in_loop

__all__ = ["BACKOFF_MAX", "Connection", "EventHandlers"]

log = structlog.get_logger()

BACKOFF_START = 1.0
BACKOFF_MAX = 30.0
KEEPALIVE_INTERVAL = 5  # seconds between keepalive probes; 3 unanswered ones lose the link
KEEPALIVE_COUNT = 3


class EventHandlers:
    """What to run on the loop for each libvirt event (same arguments as libvirt's callbacks)."""

    def __init__(
        self,
        block_job: Callable[[Any, Any, str, int, int, Any], None],
        lifecycle: Callable[[Any, Any, int, int, Any], None],
    ) -> None:
        self.block_job = block_job
        self.lifecycle = lifecycle


class Connection:
    def __init__(
        self,
        uri: str,
        handlers: EventHandlers,
        *,
        metrics: Metrics,
        notifier: Notifier,
        backoff_max: float = BACKOFF_MAX,
    ) -> None:
        self.uri = uri
        self._handlers = handlers
        self._metrics = metrics
        self._notifier = notifier
        self._backoff_max = backoff_max
        self.conn: libvirt.virConnect | None = None

    async def stay_connected(
        self,
        stopping: asyncio.Event,
        on_connected: Callable[[libvirt.virConnect, bool], Awaitable[None]],
    ) -> None:
        """Until ``stopping`` is set: connect, run ``on_connected(conn, first)``, wait for the
        connection to be lost, and start again."""
        delay = BACKOFF_START
        first = True
        while not stopping.is_set():
            lost = asyncio.Event()
            try:
                self.conn = await asyncio.to_thread(self._open, asyncio.get_running_loop(), lost)
            except libvirt.libvirtError as error:
                self._notifier.ready(f"waiting for libvirtd at {self.uri}")
                log.error("libvirt_unreachable", uri=self.uri, error=str(error), retry_in=delay)
                await _wait_any(stopping, timeout=delay)
                delay = min(delay * 2, self._backoff_max)
                continue
            delay = BACKOFF_START
            self._metrics.libvirt_connected.set(1)
            if not first:
                self._metrics.libvirt_reconnects.inc()
            log.info("libvirt_connected", uri=self.uri, reconnect=not first)
            await on_connected(self.conn, first)
            first = False
            self._notifier.ready(f"connected to {self.uri}")
            await _wait_any(lost, stopping)
            if stopping.is_set():
                break
            self._metrics.libvirt_connected.set(0)
            self._notifier.status(f"libvirtd at {self.uri} went away, reconnecting")
            log.error("libvirt_connection_lost", uri=self.uri)
            await asyncio.to_thread(self.close)

    def _open(self, loop: asyncio.AbstractEventLoop, lost: asyncio.Event) -> libvirt.virConnect:
        """Open and set up a connection (in a worker thread); a connection that fails while
        being set up is closed before the error goes on."""
        conn = libvirt.open(self.uri)
        try:
            conn.registerCloseCallback(in_loop(loop, lambda *_: lost.set()), None)
            conn.setKeepAlive(KEEPALIVE_INTERVAL, KEEPALIVE_COUNT)
            conn.domainEventRegisterAny(
                None,
                libvirt.VIR_DOMAIN_EVENT_ID_BLOCK_JOB_2,
                in_loop(loop, self._handlers.block_job),
                None,
            )
            conn.domainEventRegisterAny(
                None,
                libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE,
                in_loop(loop, self._handlers.lifecycle),
                None,
            )
        except libvirt.libvirtError:
            _close(conn)
            raise
        return conn

    def close(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            _close(conn)


def _close(conn: libvirt.virConnect) -> None:
    with contextlib.suppress(libvirt.libvirtError):
        conn.unregisterCloseCallback()
    with contextlib.suppress(libvirt.libvirtError):
        conn.close()


async def _wait_any(*events: asyncio.Event, timeout: float | None = None) -> None:
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
