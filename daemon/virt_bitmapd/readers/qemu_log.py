"""Whether a domain started between two looks: what libvirt appended to its QEMU log since.

libvirt appends a line ending in ``: starting up libvirt version: ...`` to the domain's log
(``/var/log/libvirt/qemu/NAME.log`` for the system instance) each time it starts the domain's
QEMU: a boot, a restore, an incoming migration.  A look keeps where the log ended (``LogMark``);
the next one reads only what was appended since.  No such line there, and the domain did not
start in between.  A log truncated or replaced since (rotated; its last bytes before the mark
are not what they were) tells nothing, and neither does one whose appended part is too long to
read.  What a guest can make QEMU print only adds lines:
it cannot remove libvirt's.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["ABSENT", "SYSTEM_LOG_DIR", "LogMark", "log_dir_for", "log_mark", "started_since"]

SYSTEM_LOG_DIR = "/var/log/libvirt/qemu"
#: What libvirt writes at each start, after the time stamp.
_STARTING = b": starting up libvirt version"
#: More than this appended since the last look is not read (a look reads a few lines).
_MOST_READ = 4 * 1024 * 1024
#: The bytes just before a mark, kept with it: the same bytes there later show it is the same
#: log, and a line being written as the mark was taken is read whole.
_TAIL = 256


@dataclass(frozen=True, slots=True)
class LogMark:
    """Where a domain's QEMU log ended: the file (device, inode), its size and its last bytes."""

    device: int
    inode: int
    size: int
    tail: bytes = b""


#: There was no log (the domain had not started since its logs were last removed).
ABSENT = LogMark(0, 0, 0)


def log_dir_for(uri: str) -> str | None:
    """Where libvirt keeps the QEMU logs of the domains of ``uri``; None when not known here
    (then no look can prove a domain did not start)."""
    if uri.split("?", 1)[0] in ("qemu:///system", "qemu+unix:///system"):
        return SYSTEM_LOG_DIR
    return None


def log_path(log_dir: str, domain: str) -> str | None:
    """The log of ``domain``; None for a name that cannot be a file in ``log_dir``."""
    if not domain or "/" in domain or domain.startswith(".") or "\0" in domain:
        return None
    return os.path.join(log_dir, f"{domain}.log")


def log_mark(log_dir: str | None, domain: str) -> LogMark | None:
    """Where the domain's log ends now: ABSENT when there is none; None when that cannot be
    told (no known log directory, the log unreadable or not a file)."""
    path = None if log_dir is None else log_path(log_dir, domain)
    if path is None:
        return None
    try:
        read = _read_file(path, lambda st: (max(0, st.st_size - _TAIL), _TAIL))
    except FileNotFoundError:
        return ABSENT
    if read is None:
        return None
    st, start, tail = read
    return LogMark(st.st_dev, st.st_ino, start + len(tail), tail)


def started_since(
    log_dir: str | None, domain: str, then: LogMark | None, now: LogMark | None
) -> bool | None:
    """Whether libvirt started the domain between the marks ``then`` and ``now`` (taken in
    that order); None when the log cannot tell."""
    if then is None or now is None or log_dir is None:
        return None
    if now == ABSENT:
        return False if then == ABSENT else None  # removed since: nothing to tell by
    path = log_path(log_dir, domain)
    start = 0 if then == ABSENT else then.size - len(then.tail)
    if path is None or now.size - start > _MOST_READ:
        return None
    if then != ABSENT and (now.device, now.inode) != (then.device, then.inode):
        return None  # replaced since
    read = _read(path, now, start)
    if read is None or not read.startswith(then.tail):
        return None  # truncated or replaced since (an inode number can be reused)
    # From the start of the line the mark fell in: a line ended before it is no news.
    since = read[then.tail.rfind(b"\n") + 1 :]
    return _STARTING in since


def _read(path: str, now: LogMark, start: int) -> bytes | None:
    """The log from ``start`` up to the mark ``now``; None when it is not that file any more."""
    if start < 0 or now.size < start:
        return None

    def span(st: os.stat_result) -> tuple[int, int] | None:
        same = (st.st_dev, st.st_ino) == (now.device, now.inode)
        return (start, now.size - start) if same else None

    try:
        read = _read_file(path, span)
    except FileNotFoundError:
        return None
    if read is None or len(read[2]) != now.size - start:
        return None
    return read[2]


def _read_file(
    path: str, span: Callable[[os.stat_result], tuple[int, int] | None]
) -> tuple[os.stat_result, int, bytes] | None:
    """Open the regular file ``path`` (never through a symbolic link) and read what ``span``
    names from its stat (offset, length): the stat, the offset and the bytes; None when it is
    not a regular file, ``span`` says no, or it cannot be read.  FileNotFoundError passes."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        where = span(st) if stat.S_ISREG(st.st_mode) else None
        if where is None:
            return None
        return st, where[0], os.pread(fd, where[1], where[0])
    except OSError:
        return None
    finally:
        os.close(fd)
