"""A storm of block job events: 1,000 COMPLETED commit events for 50 disks in one burst.

The daemon runs in this process on the real libvirtd, with 50 real shut-off domains on real
qcow2 chains; the events are handed to its intake on the loop's thread, exactly as its libvirt
event thread hands them over (libvirt cannot be made to send a thousand real ones in a burst).
Each look is real: the images read, the state written. Every disk must be looked at, none more
than twice, and a second burst must leave the memory where the first left it.
"""

from __future__ import annotations

import asyncio
import gc
import tracemalloc
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import libvirt
import pytest

from helpers.images import add_bitmap, create
from helpers.libvirt_env import Domains
from virt_bitmapd.config import Settings
from virt_bitmapd.service.daemon import Daemon

pytestmark = pytest.mark.real

DISKS = 50
EVENTS = 1000
KiB = 1024


async def until(check: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def test_a_burst_of_a_thousand_events_looks_at_each_disk_once_or_twice(
    tmp_path: Path, domains: Domains
) -> None:
    names = []
    for index in range(DISKS):
        base = create(tmp_path / f"d{index}.base.qcow2")
        add_bitmap(base, "cp1")
        top = create(tmp_path / f"d{index}.top.qcow2", backing=base)
        add_bitmap(top, "cp1")
        names.append(domains.define(top).name())
    settings = Settings(
        storage_roots=(str(tmp_path),),
        state_dir=str(tmp_path / "state"),
        metrics_listen="",
        rescan_interval=3600,
    )
    looks: Counter[tuple[str, str]] = Counter()
    retained: list[int] = []

    async def main() -> None:
        daemon = Daemon(settings)
        look = daemon.look

        def counting(domain: Any, target: str, **options: Any) -> Any:
            looks[(domain.UUIDString(), target)] += 1
            return look(domain, target, **options)

        daemon.look = counting  # type: ignore[assignment]
        running = asyncio.create_task(daemon.run())
        try:
            await until(lambda: len(looks) >= DISKS, "the startup looks")
            await daemon._scheduler.drain()
            conn = daemon._connection.conn
            assert conn is not None
            doms = [conn.lookupByName(name) for name in names]
            tracemalloc.start()
            for _burst in range(2):
                looks.clear()
                gc.collect()
                before = tracemalloc.get_traced_memory()[0]
                for event in range(EVENTS):
                    daemon._intake.block_job(
                        conn,
                        doms[event % DISKS],
                        "vda",
                        libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_COMMIT,
                        libvirt.VIR_DOMAIN_BLOCK_JOB_COMPLETED,
                        None,
                    )
                await asyncio.sleep(0)
                await daemon._scheduler.drain()
                gc.collect()
                retained.append(tracemalloc.get_traced_memory()[0] - before)
                assert len(looks) == DISKS, f"{DISKS - len(looks)} disks were not looked at"
                assert max(looks.values()) <= 2, looks.most_common(3)
        finally:
            tracemalloc.stop()
            daemon.stop()
            await running

    asyncio.run(main())
    # the first burst may fill caches (log formatting, libvirt objects); the second adds nothing
    assert retained[1] < 64 * KiB, retained
