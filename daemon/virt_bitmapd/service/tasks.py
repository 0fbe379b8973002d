"""Background work that never dies silently: periodic steps and one-off tasks, supervised.

An exception in a periodic step is logged with its traceback and counted, and the step runs
again at its next period; a one-off task's exception is logged and counted the same way instead
of waiting, unretrieved, for garbage collection.  Cancellation (the daemon stopping) is not an
error.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import structlog

__all__ = ["TaskSupervisor"]

log = structlog.get_logger()


class TaskSupervisor:
    """Owns the daemon's background tasks; ``on_error(task_name)`` counts each failure."""

    def __init__(self, on_error: Callable[[str], None]) -> None:
        self._on_error = on_error
        self._tasks: set[asyncio.Task[None]] = set()

    def every(
        self, name: str, period: Callable[[], float], step: Callable[[], Awaitable[None]]
    ) -> None:
        """Run ``step`` after each ``period()`` seconds, for as long as the daemon runs."""

        async def loop() -> None:
            while True:
                await asyncio.sleep(period())
                await self._guarded(name, step())

        self.spawn(name, loop())

    def spawn(self, name: str, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` once, in the background."""
        task = asyncio.get_running_loop().create_task(self._guarded(name, work), name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        # a task cancelled before it ran (the daemon stopping as an event arrives) never awaits
        # ``work``: close it, or asyncio reports a coroutine never awaited (a no-op otherwise)
        task.add_done_callback(lambda _task: work.close())

    async def _guarded(self, name: str, work: Awaitable[None]) -> None:
        try:
            await work
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("background_task_failed", task=name)
            self._on_error(name)

    def cancel_all(self) -> None:
        for task in list(self._tasks):
            task.cancel()
