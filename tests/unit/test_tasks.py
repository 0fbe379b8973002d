"""Background work cancelled before it ran leaves no coroutine never awaited."""

from __future__ import annotations

import asyncio
import gc
import warnings

from virt_bitmapd.service.tasks import TaskSupervisor


def test_work_cancelled_before_it_ran_is_closed_not_left_unawaited() -> None:
    ran: list[str] = []

    async def work() -> None:
        ran.append("work")

    async def main() -> None:
        supervisor = TaskSupervisor(lambda _name: None)
        supervisor.spawn("rescan_domain", work())
        supervisor.cancel_all()  # the daemon stopping as the event arrived
        await asyncio.sleep(0)

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        asyncio.run(main())
        gc.collect()
    assert ran == []
