"""The QEMU tools virt-bitmapd starts die with it, and what a killed daemon left is ended.

Every long-lived tool (qemu-storage-daemon, which holds images open while it waits for
commands) asks the kernel, between fork and exec, to be killed when the thread that started it
dies (``prctl(PR_SET_PDEATHSIG, SIGKILL)``), and ends at once if that thread is gone already.
Without that, a daemon killed in the middle of a reconciliation at rest left its
qemu-storage-daemon holding the base read-write (that tool does not end when its standard input
closes), and the domain could not start ("Is another process using the image").  The call is
made in the child by ``preexec_fn``, which Python warns may deadlock in a threaded program when
the function needs a lock another thread held at the fork: this one takes none (one foreign
call on a library loaded beforehand, no import, no allocation worth the name).  ``setpriv
--pdeathsig`` would need no Python in the child, but it fails without capabilities, as the
service runs.  ``qemu-img info`` runs plainly: it reads for milliseconds and ends by itself,
and forking the daemon instead of the fast path Python takes without ``preexec_fn`` costs each
call 2.4 ms more (measured: 5.8 ms against 3.4 ms), seconds at a large host's startup.

The daemon also records each qemu-storage-daemon it starts in its state directory
(``tools/PID.json``: the tool, its pid and its start time in clock ticks since boot), and removes
the record when the tool has ended.  At its start it ends every recorded tool that is still the
same process (same pid, start time and name), and only those: a pid reused by anything else is
left alone.  The one-shot commands keep no records (the kernel's signal is theirs too).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["Leftover", "Records", "ended", "record_in", "start"]

GONE_WAIT = 2.0  # seconds for a killed leftover to disappear
PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(None, use_errno=True)


def _dies_with(parent: int) -> Callable[[], None]:
    def in_the_child() -> None:
        if _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0 or os.getppid() != parent:
            os._exit(127)  # no promise to die with the caller, or the caller is gone: no tool

    return in_the_child


def start(argv: Sequence[str], **popen: Any) -> subprocess.Popen[bytes]:
    """Start a long-lived tool (``subprocess.Popen`` arguments in ``popen``) that dies with
    its caller, recorded when the daemon keeps records."""
    process: subprocess.Popen[bytes] = subprocess.Popen(
        list(argv),
        preexec_fn=_dies_with(os.getpid()),  # noqa: PLW1509 - see the module's docstring
        **popen,
    )
    if _records is not None:
        _records.started(process.pid, os.path.basename(argv[0]))
    return process


def ended(process: subprocess.Popen[bytes]) -> None:
    """The tool ``start`` started has ended (its record goes)."""
    if _records is not None:
        _records.ended(process.pid)


@dataclass(frozen=True, slots=True)
class Leftover:
    pid: int
    tool: str


class Records:
    def __init__(self, state_dir: str | Path) -> None:
        self.directory = Path(state_dir) / "tools"

    def started(self, pid: int, tool: str) -> None:
        began = _start_ticks(pid)
        if began is None:
            return  # already gone
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = self.directory / f"{pid}.json"
        path.write_text(json.dumps({"pid": pid, "start": began, "tool": tool}))

    def ended(self, pid: int) -> None:
        (self.directory / f"{pid}.json").unlink(missing_ok=True)

    def end_leftovers(self) -> list[Leftover]:
        """End every recorded tool still running as the same process; forget every record."""
        ended: list[Leftover] = []
        if not self.directory.is_dir():
            return ended
        for path in sorted(self.directory.glob("*.json")):
            try:
                record = json.loads(path.read_text())
                pid, began, tool = int(record["pid"]), int(record["start"]), str(record["tool"])
            except (OSError, ValueError, KeyError, TypeError):
                path.unlink(missing_ok=True)
                continue
            if _start_ticks(pid) == began and _name(pid) == tool[:15]:
                _kill(pid)
                ended.append(Leftover(pid, tool))
            path.unlink(missing_ok=True)
        return ended


_records: Records | None = None


def record_in(state_dir: str | Path) -> Records:
    """Keep records of the tools started from now on under ``state_dir`` (the daemon)."""
    global _records  # noqa: PLW0603 - one process-wide setting, made once at the daemon's start
    _records = Records(state_dir)
    return _records


def _start_ticks(pid: int) -> int | None:
    """The process's start time (clock ticks since boot), or None when there is no such
    process running (a zombie has ended: only its parent has not heard yet)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] == "Z":
        return None
    return int(fields[19])  # field 22 of proc_pid_stat(5); the list starts at field 3


def _name(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return None


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + GONE_WAIT
    while time.monotonic() < deadline and _start_ticks(pid) is not None:
        time.sleep(0.02)
