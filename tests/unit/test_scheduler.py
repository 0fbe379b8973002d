"""Per-key serialization, coalescing and the concurrency bound."""

from __future__ import annotations

import asyncio

import pytest

from virt_bitmapd.service.event_intake import Action, block_job_action
from virt_bitmapd.service.scheduler import (
    TRANSITIONS,
    BlockJob,
    LookRequest,
    Scheduler,
    Slot,
    TransitionError,
)


def run(coroutine: object) -> None:
    asyncio.run(coroutine)  # type: ignore[arg-type]


def test_burst_for_a_busy_key_coalesces_into_one_more_run() -> None:
    calls: list[tuple[str, str]] = []

    async def main() -> None:
        gate = asyncio.Event()

        async def job(key: str, request: LookRequest) -> None:
            calls.append((key, request.trigger))
            await gate.wait()

        scheduler = Scheduler(job, concurrency=4)
        scheduler.submit("vda", LookRequest.because("event"))
        await asyncio.sleep(0)
        assert scheduler.state("vda") is Slot.RUNNING
        for trigger in ("rescan", "event", "manual"):
            scheduler.submit("vda", LookRequest.because(trigger))
        assert scheduler.state("vda") is Slot.AGAIN
        gate.set()
        await scheduler.drain()
        assert scheduler.state("vda") is Slot.IDLE

    run(main())
    assert calls == [("vda", "event"), ("vda", "rescan")]


def test_coalesced_requests_keep_every_reason_and_the_latest_job() -> None:
    requests: list[LookRequest] = []

    async def main() -> None:
        gate = asyncio.Event()

        async def job(key: str, request: LookRequest) -> None:
            requests.append(request)
            await gate.wait()

        scheduler = Scheduler(job, concurrency=1)
        scheduler.submit("vda", LookRequest.because("rescan"))
        await asyncio.sleep(0)
        ready = BlockJob("active_commit", completed=False)
        completed = BlockJob("active_commit", completed=True)
        scheduler.submit("vda", LookRequest.because("watch"))
        scheduler.submit("vda", LookRequest.because("event", ready))
        scheduler.submit("vda", LookRequest.because("event", completed))
        scheduler.submit("vda", LookRequest.because("watch"))
        gate.set()
        await scheduler.drain()

    run(main())
    assert requests == [
        LookRequest(("rescan",)),
        LookRequest(("watch", "event"), BlockJob("active_commit", completed=True)),
    ]
    assert requests[1].trigger == "watch"


def test_keys_run_in_parallel_up_to_the_bound() -> None:
    running = 0
    peak = 0

    async def main() -> None:
        async def job(key: str, request: LookRequest) -> None:
            nonlocal running, peak
            running += 1
            peak = max(peak, running)
            await asyncio.sleep(0.01)
            running -= 1

        scheduler = Scheduler(job, concurrency=2)
        for key in "abcdef":
            scheduler.submit(key, LookRequest.because("rescan"))
        await scheduler.drain()

    run(main())
    assert peak == 2


def test_a_crashing_job_does_not_stop_the_key() -> None:
    calls = 0

    async def main() -> None:
        async def job(key: str, request: LookRequest) -> None:
            nonlocal calls
            calls += 1
            raise RuntimeError("bug")

        scheduler = Scheduler(job, concurrency=1)
        scheduler.submit("a", LookRequest.because("event"))
        await scheduler.drain()
        scheduler.submit("a", LookRequest.because("event"))
        await scheduler.drain()

    run(main())
    assert calls == 2


def test_closed_scheduler_takes_nothing_and_waits_for_running_jobs() -> None:
    finished: list[str] = []

    async def main() -> None:
        async def job(key: str, request: LookRequest) -> None:
            await asyncio.sleep(0.05)
            finished.append(key)

        scheduler = Scheduler(job, concurrency=1)
        scheduler.submit("a", LookRequest.because("event"))
        scheduler.submit("b", LookRequest.because("event"))
        await asyncio.sleep(0)
        assert await scheduler.close(timeout=5)
        assert not scheduler.submit("c", LookRequest.because("event"))

    run(main())
    assert finished == ["a"]  # "b" was queued, never started


def test_transition_table_names_state_and_event() -> None:
    assert (Slot.IDLE, "finish") not in TRANSITIONS
    scheduler = Scheduler(lambda key, request: asyncio.sleep(0), concurrency=1)
    with pytest.raises(TransitionError, match="'finish' does not fit state 'idle'"):
        scheduler._move("vda", "finish")


@pytest.mark.parametrize(
    ("job_type", "status", "action"),
    [
        ("commit", "completed", Action.LOOK),
        ("active_commit", "completed", Action.LOOK),
        ("active_commit", "ready", Action.LOOK_BEFORE_PIVOT),
        ("commit", "ready", Action.NONE),
        ("commit", "failed", Action.NONE),
        ("active_commit", "canceled", Action.NONE),
        ("pull", "completed", Action.NONE),
        ("copy", "ready", Action.NONE),
        ("copy", "completed", Action.LOOK),
        ("backup", "completed", Action.NONE),
        ("unknown_9", "unknown_7", Action.NONE),
    ],
)
def test_what_a_block_job_event_asks_for(job_type: str, status: str, action: Action) -> None:
    assert block_job_action(job_type, status) is action


def test_settled_waits_for_the_run_asked_for_after_the_running_one() -> None:
    finished: list[str] = []

    async def main() -> None:
        gate = asyncio.Event()

        async def job(key: str, request: LookRequest) -> None:
            await gate.wait()
            finished.append(request.trigger)

        scheduler = Scheduler(job, concurrency=2)
        await scheduler.settled("vda")  # idle: at once
        scheduler.submit("vda", LookRequest.because("event"))
        await asyncio.sleep(0)
        scheduler.submit("vda", LookRequest.because("check"))  # while the event's look runs
        waiting = asyncio.ensure_future(scheduler.settled("vda"))
        await asyncio.sleep(0)
        assert not waiting.done()
        gate.set()
        await waiting
        assert finished == ["event", "check"]

    run(main())
