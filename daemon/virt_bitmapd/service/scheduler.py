"""Run work per key (a domain's disk): one at a time per key, several keys at once, and work
asked for while a key is busy coalesced into one more run.

Each key moves through a small state machine, written as a table:

    IDLE --submit--> QUEUED --start--> RUNNING --finish--> IDLE
                                       RUNNING --submit--> AGAIN --finish--> QUEUED

so a burst of events for one disk while it is being reconciled causes exactly one more look,
with the freshest state, instead of one per event.  What is asked for is a ``LookRequest``:
requests coalesced into one run merge their reasons (none is dropped) and keep the latest block
job an event announced.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Any

import structlog

__all__ = ["BlockJob", "LookRequest", "Scheduler", "Slot", "TransitionError"]

log = structlog.get_logger()


@dataclass(frozen=True, slots=True)
class BlockJob:
    """The block job a libvirt event announced for the disk."""

    type: str
    #: COMPLETED (else READY: an active commit waiting for its pivot)
    completed: bool


@dataclass(frozen=True, slots=True)
class LookRequest:
    """Why a look is wanted: its reasons (the first is the trigger that logs and metrics name)
    and the block job an event announced, if one did."""

    reasons: tuple[str, ...]
    job: BlockJob | None = None

    @classmethod
    def because(cls, reason: str, job: BlockJob | None = None) -> LookRequest:
        return cls((reason,), job)

    @property
    def trigger(self) -> str:
        return self.reasons[0]

    def merged(self, later: LookRequest) -> LookRequest:
        reasons = self.reasons + tuple(r for r in later.reasons if r not in self.reasons)
        return LookRequest(reasons, later.job or self.job)


class Slot(enum.Enum):
    IDLE = "idle"
    QUEUED = "queued"
    RUNNING = "running"
    AGAIN = "running, then again"


TRANSITIONS: dict[tuple[Slot, str], Slot] = {
    (Slot.IDLE, "submit"): Slot.QUEUED,
    (Slot.QUEUED, "submit"): Slot.QUEUED,
    (Slot.RUNNING, "submit"): Slot.AGAIN,
    (Slot.AGAIN, "submit"): Slot.AGAIN,
    (Slot.QUEUED, "start"): Slot.RUNNING,
    (Slot.RUNNING, "finish"): Slot.IDLE,
    (Slot.AGAIN, "finish"): Slot.QUEUED,
}


class TransitionError(RuntimeError):
    def __init__(self, key: Hashable, slot: Slot, event: str) -> None:
        super().__init__(f"{key}: event {event!r} does not fit state {slot.value!r}")


Job = Callable[[Any, LookRequest], Awaitable[None]]


class Scheduler:
    """``submit(key, request)`` runs ``job(key, request)``, serialized per key, at most
    ``concurrency`` at once.  Coalesced submissions merge their requests."""

    def __init__(self, job: Job, concurrency: int) -> None:
        self._job = job
        self._slots: dict[Hashable, Slot] = {}
        self._requests: dict[Hashable, LookRequest] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._limit = asyncio.Semaphore(concurrency)
        self._closed = False
        self._settling: dict[Hashable, list[asyncio.Future[None]]] = {}

    def state(self, key: Hashable) -> Slot:
        return self._slots.get(key, Slot.IDLE)

    def _move(self, key: Hashable, event: str) -> Slot:
        current = self.state(key)
        new = TRANSITIONS.get((current, event))
        if new is None:
            raise TransitionError(key, current, event)
        if new is Slot.IDLE:
            self._slots.pop(key, None)
            for waiter in self._settling.pop(key, []):
                if not waiter.done():
                    waiter.set_result(None)
        else:
            self._slots[key] = new
        return new

    def submit(self, key: Hashable, request: LookRequest) -> bool:
        """Ask for a run; False once the scheduler is closed (the daemon is stopping)."""
        if self._closed:
            return False
        was_idle = self.state(key) is Slot.IDLE
        self._move(key, "submit")
        waiting = self._requests.get(key)
        self._requests[key] = request if waiting is None else waiting.merged(request)
        if was_idle:
            task = asyncio.get_running_loop().create_task(self._drive(key))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return True

    async def settled(self, key: Hashable) -> None:
        """Return once ``key`` has nothing queued or running: every run asked for before this
        call has ended (a run asked for while one runs is waited for too)."""
        if self.state(key) is Slot.IDLE:
            return
        waiter = asyncio.get_running_loop().create_future()
        self._settling.setdefault(key, []).append(waiter)
        await waiter

    async def _drive(self, key: Hashable) -> None:
        while True:
            async with self._limit:
                if self._closed:
                    self._slots.pop(key, None)
                    self._requests.pop(key, None)
                    for waiter in self._settling.pop(key, []):
                        waiter.cancel()
                    return
                self._move(key, "start")
                request = self._requests.pop(key)
                try:
                    await self._job(key, request)
                except Exception:  # a bug in one job must not stop the others
                    log.exception("job_crashed", key=str(key), trigger=request.trigger)
            if self._move(key, "finish") is Slot.IDLE:
                return

    async def drain(self) -> None:
        """Wait until nothing is queued or running."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def close(self, timeout: float) -> bool:
        """Start nothing new, let running jobs finish; True if all did within ``timeout``."""
        self._closed = True
        try:
            await asyncio.wait_for(asyncio.shield(self.drain()), timeout)
        except TimeoutError:
            return False
        return True
