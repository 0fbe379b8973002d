"""Waiting for a block job of ours to end, through whichever QMP transport started it."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from ..errors import ToolFailed
from ..qemu_messages import image_error_from_qemu
from ..qmp import JSON

__all__ = ["JOB_POLL", "wait_for_job"]

JOB_POLL = 0.05  # seconds between looks at the job


def wait_for_job(
    execute: Callable[[JSON], Any], job: str, path: str, *, timeout: float, what: str
) -> None:
    """Until job ``job`` (started with ``auto-dismiss`` off) concludes, then dismiss it.
    Raises ToolFailed when it runs longer than ``timeout`` (it is cancelled), and QEMU's error
    about ``path`` when it failed.  ``what``: what the job does, for the timeout's message."""
    deadline = time.monotonic() + timeout
    while True:
        jobs = [entry for entry in execute({"execute": "query-jobs"}) if entry["id"] == job]
        if not jobs or jobs[0]["status"] == "concluded":
            break
        if time.monotonic() > deadline:
            execute({"execute": "job-cancel", "arguments": {"id": job}})
            raise ToolFailed(f"{path}: {what} took over {timeout:.0f} s")
        time.sleep(JOB_POLL)
    if not jobs:
        return
    execute({"execute": "job-dismiss", "arguments": {"id": job}})
    if jobs[0].get("error"):
        raise image_error_from_qemu(path, str(jobs[0]["error"]))
