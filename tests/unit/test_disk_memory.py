"""The daemon's per-disk memory and retry rules, as tables."""

from __future__ import annotations

import pytest

from virt_bitmapd.service.disk_memory import (
    COMMIT_ATTEMPTS,
    DiskMemory,
    commit_retry_delay,
    look_retry_delay,
)


@pytest.mark.parametrize(
    ("failures", "delay"),
    [(1, 5.0), (2, 10.0), (3, 20.0), (4, 40.0), (5, 80.0), (6, None), (7, None)],
)
def test_a_commit_is_tried_again_with_growing_delays_then_counted(
    failures: int, delay: float | None
) -> None:
    assert COMMIT_ATTEMPTS == 6
    assert commit_retry_delay(failures) == delay


@pytest.mark.parametrize(
    ("previous", "cap", "delay"), [(None, 300, 5.0), (5.0, 300, 10.0), (200.0, 300, 300)]
)
def test_looks_are_retried_up_to_the_rescan_interval(
    previous: float | None, cap: float, delay: float
) -> None:
    assert look_retry_delay(previous, cap) == delay


def test_an_error_is_news_once_per_change() -> None:
    memory = DiskMemory()
    key = ("u1", "vda")
    assert memory.record_error(key, "image_corrupt", "/i/a: bad")
    assert not memory.record_error(key, "image_corrupt", "/i/a: bad")
    assert memory.record_error(key, "image_missing", "/i/a: gone")
    assert memory.errors_by_kind() == {"image_missing": 1}
    assert memory.clear_error(key) == ("image_missing", "/i/a: gone")
    assert memory.clear_error(key) is None


def test_the_memory_shrinks_when_a_domain_goes() -> None:
    memory = DiskMemory()
    for uuid in ("u1", "u2"):
        key = (uuid, "vda")
        memory.checkpoint_states[key] = {"cp1": "usable"}
        memory.skip_logged.add(key)
        memory.look_delays[key] = 5.0
        memory.commit_failures[key] = 2
        memory.unclaimed_commits[key] = 1.0
        memory.record_error(key, "image_corrupt", "x")
        memory.absent_logged.add(uuid)
    memory.forget_domain("u1")
    held = (
        memory.checkpoint_states,
        memory.skip_logged,
        memory.look_delays,
        memory.commit_failures,
        memory.unclaimed_commits,
        memory.errors,
    )
    assert all(set(entries) == {("u2", "vda")} for entries in held)
    assert memory.absent_logged == {"u2"}
    memory.forget_domain("u2")
    assert not any(held) and not memory.absent_logged
