"""Notices files appearing and changing in the directories that hold the known layers (and in
the storage roots), so that a snapshot, which libvirt announces with no event, is known at once.

Watched: a name created, moved in or out, deleted, closed after writing, or its owner or mode
changed (libvirt labels a layer it adds to a running domain, ``--reuse-external`` included).
Not watched: plain writes and opens. A guest writes its active layer all the time, and the
daemon's own reads would wake it again.

Events are collected until the directory is quiet for ``settle`` seconds (a snapshot is a burst:
create, format, label) and then handed over as {directory: names}, all at once. An overflowing
kernel queue hands over every watched directory. Runs on the event loop's thread only.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterable

import structlog

from .inotify import (
    IN_ATTRIB,
    IN_CLOSE_WRITE,
    IN_CREATE,
    IN_DELETE,
    IN_IGNORED,
    IN_MOVED_FROM,
    IN_MOVED_TO,
    IN_Q_OVERFLOW,
    Inotify,
)

__all__ = ["SETTLE", "WATCH_MASK", "LayerWatch"]

log = structlog.get_logger()

WATCH_MASK = IN_CREATE | IN_MOVED_TO | IN_MOVED_FROM | IN_DELETE | IN_CLOSE_WRITE | IN_ATTRIB
SETTLE = 0.2  # seconds without events before a burst is handed over

Changes = dict[str, set[str]]  # directory -> names that changed there ("" = unknown names)


class LayerWatch:
    def __init__(self, on_change: Callable[[Changes], None], *, settle: float = SETTLE) -> None:
        self._on_change = on_change
        self._settle = settle
        self._inotify: Inotify | None = None
        self._directories: dict[int, str] = {}  # watch descriptor -> directory
        self._watched: dict[str, int] = {}
        self._failed: set[str] = set()  # directories whose watch failure was logged
        self._pending: Changes = {}
        self._timer: asyncio.TimerHandle | None = None

    @property
    def directories(self) -> set[str]:
        return set(self._watched)

    def start(self) -> bool:
        """False when the kernel gives no inotify instance: the safety net alone then."""
        try:
            self._inotify = Inotify()
        except OSError as error:
            log.error("watch_unavailable", error=str(error))
            return False
        asyncio.get_running_loop().add_reader(self._inotify.fileno(), self._readable)
        return True

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._inotify is not None:
            asyncio.get_running_loop().remove_reader(self._inotify.fileno())
            self._inotify.close()
            self._inotify = None

    def watch(self, directories: Iterable[str]) -> None:
        """Watch exactly ``directories`` from now on."""
        if self._inotify is None:
            return
        wanted = set(directories)
        for directory in set(self._watched) - wanted:
            wd = self._watched.pop(directory)
            self._directories.pop(wd, None)
            self._inotify.remove(wd)
        for directory in sorted(wanted - set(self._watched)):
            try:
                wd = self._inotify.add(directory, WATCH_MASK)
            except OSError as error:  # gone, not a directory, or the kernel's watch limit
                if directory not in self._failed:
                    self._failed.add(directory)
                    log.warning("directory_unwatched", directory=directory, error=str(error))
                continue
            self._failed.discard(directory)
            self._watched[directory] = wd
            self._directories[wd] = directory

    def _readable(self) -> None:
        if self._inotify is None:
            return
        for event in self._inotify.read():
            if event.mask & IN_Q_OVERFLOW:
                for watched in self._watched:
                    self._pending.setdefault(watched, set()).add("")
                continue
            directory = self._directories.get(event.wd)
            if directory is None:
                continue
            if event.mask & IN_IGNORED:  # the directory itself went away
                del self._directories[event.wd]
                self._watched.pop(directory, None)
                continue
            self._pending.setdefault(directory, set()).add(event.name)
        if self._pending:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = asyncio.get_running_loop().call_later(self._settle, self._hand_over)

    def _hand_over(self) -> None:
        self._timer = None
        changes, self._pending = self._pending, {}
        self._on_change(changes)


def layer_directories(chains: Iterable[tuple[str, ...]], roots: Iterable[str]) -> set[str]:
    """The directories to watch: those holding a known layer, and the storage roots."""
    directories = {os.path.dirname(path) for chain in chains for path in chain}
    return directories | {os.path.realpath(root) for root in roots}
