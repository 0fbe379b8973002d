"""Each disk's last known chain, kept in the state directory so it survives restarts.

One JSON file per domain (named by its UUID), replaced atomically (write, fsync, rename), so a
crash leaves either the old file or the new one, never half of one.  Disks of one domain are
looked at in parallel threads, so changes go through a read-modify-write under a lock.

A look at a disk can still be running when its domain is undefined.  Each forget therefore starts
a new generation of the domain; a write from a look begun in an older generation is dropped, so a
forgotten domain is not brought back by work that started before it went.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from .errors import StateUnusable
from .filling import Filled
from .fingerprints import Fingerprint
from .health import Distrust
from .marks import Marks
from .model import Bitmap
from .state_record import (
    NO_REASON_KEPT,
    DomainState,
    drop_disk,
    state_from_json,
    state_to_json,
)

__all__ = ["NO_REASON_KEPT", "Distrust", "DomainState", "StateStore"]


class StateStore:
    def __init__(
        self,
        directory: str | Path,
        *,
        on_quarantine: Callable[[str, str], None] | None = None,
        read_only: bool = False,
    ) -> None:
        """``on_quarantine(path, why)`` is told of each state file set aside as unreadable;
        ``read_only``: for readers beside the daemon (``status``), which never move a file."""
        self.directory = Path(directory) / "domains"
        self._on_quarantine = on_quarantine
        self._read_only = read_only
        self._lock = threading.Lock()
        self._generations: dict[str, int] = {}

    def generation(self, uuid: str) -> int:
        """How many times the domain was forgotten by this process; pass it back on writes."""
        with self._lock:
            return self._generations.get(uuid, 0)

    def is_current(self, uuid: str, generation: int) -> bool:
        """Whether the domain was not forgotten since ``generation`` was read: work begun
        before a forget must not bring the domain back, nor speak for it."""
        return self._generations.get(uuid, 0) == generation

    def _path(self, uuid: str) -> Path:
        if not uuid or "/" in uuid or uuid.startswith("."):
            raise ValueError(f"not a domain UUID: {uuid!r}")
        return self.directory / f"{uuid}.json"

    def load(self, uuid: str) -> DomainState | None:
        path = self._path(uuid)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            self._quarantine(path, f"not JSON: {error}")
            return None
        except OSError as error:
            raise StateUnusable(f"{path}: cannot read the state: {error}") from error
        try:
            return state_from_json(uuid, raw)
        except (AttributeError, KeyError, TypeError, ValueError) as error:
            self._quarantine(path, f"not a state file of this version: {error!r}")
            return None

    def _quarantine(self, path: Path, why: str) -> None:
        """Writes are atomic, so only outside hands make a file unreadable: set it aside for
        them to see, and start afresh for the domain (its disks are tracked anew)."""
        if self._read_only:
            return
        target = path.with_suffix(".json.corrupt")
        try:
            path.replace(target)
        except OSError as error:
            raise StateUnusable(
                f"{path}: cannot set the unreadable state aside: {error}"
            ) from error
        if self._on_quarantine is not None:
            self._on_quarantine(str(target), why)

    def put_disk(
        self,
        uuid: str,
        *,
        name: str,
        disk: str,
        chain: tuple[str, ...],
        untrusted: Mapping[str, Distrust],
        bitmaps: Mapping[str, tuple[Bitmap, ...]],
        looked_at: float | None = None,
        generation: int = 0,
        merged_into: Mapping[str, str] | None = None,
        births: Mapping[str, tuple[int, str]] | None = None,
        filled: Mapping[str, Filled] | None = None,
        united: tuple[str, ...] | None = None,
        fingerprint: Fingerprint | None = None,
        marks: Marks | None = None,
    ) -> bool:
        """Store one disk's chain; False (nothing written) when the domain was forgotten since
        ``generation`` was read. ``fingerprint``: what the look saw, if it may spare the next
        one reading the images (None forgets an earlier one); ``marks``: where things stood as the
        look ended (None keeps the earlier ones)."""
        with self._lock:
            if not self.is_current(uuid, generation):
                return False
            state = self.load(uuid) or DomainState(uuid=uuid, name=name)
            state.name = name
            state.chains[disk] = chain
            state.untrusted[disk] = dict(untrusted)
            state.bitmaps[disk] = dict(bitmaps)
            if merged_into is not None:
                state.merged_into[disk] = dict(merged_into)
            if births is not None:
                state.births[disk] = dict(births)
            if filled is not None:
                state.filled[disk] = dict(filled)
            if united is not None:
                state.united[disk] = united
            if looked_at is not None:
                state.looked_at[disk] = looked_at
            if fingerprint is None:
                state.fingerprints.pop(disk, None)
            else:
                state.fingerprints[disk] = fingerprint
            if marks is not None:
                state.marks[disk] = marks
            self._save(state)
            return True

    def touch(self, uuid: str) -> None:
        """Mark the domain's state as seen now without rewriting it (its age, ``age``)."""
        try:
            os.utime(self._path(uuid))
        except FileNotFoundError:
            pass
        except OSError as error:
            raise StateUnusable(f"{self._path(uuid)}: cannot update: {error}") from error

    def drop_disk(self, uuid: str, disk: str, generation: int = 0) -> None:
        with self._lock:
            if not self.is_current(uuid, generation):
                return
            state = self.load(uuid)
            if state is not None and disk in state.chains:
                drop_disk(state, disk)
                self._save(state)

    def _save(self, state: DomainState) -> None:
        try:
            self._write(state)
        except OSError as error:
            raise StateUnusable(f"{self.directory}: cannot save the state: {error}") from error

    def _write(self, state: DomainState) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        document = state_to_json(state)
        target = self._path(state.uuid)
        handle, temporary = tempfile.mkstemp(dir=self.directory, prefix=".tmp-")
        try:
            with os.fdopen(handle, "w") as stream:
                json.dump(document, stream, indent=2)
                stream.flush()
                os.fsync(stream.fileno())
            os.replace(temporary, target)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        directory = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)

    def forget(self, uuid: str) -> None:
        with self._lock:
            self._generations[uuid] = self._generations.get(uuid, 0) + 1
            try:
                self._path(uuid).unlink(missing_ok=True)
            except OSError as error:
                raise StateUnusable(f"{self._path(uuid)}: cannot remove: {error}") from error

    def age(self, uuid: str) -> float | None:
        """Seconds since the domain's state was last written (by a look at one of its disks);
        None when there is none."""
        try:
            return time.time() - self._path(uuid).stat().st_mtime
        except FileNotFoundError:
            return None
        except OSError as error:
            raise StateUnusable(f"{self._path(uuid)}: cannot read the state: {error}") from error

    def known(self) -> list[str]:
        if not self.directory.is_dir():
            return []
        return sorted(
            path.stem for path in self.directory.glob("*.json") if not path.name.startswith(".")
        )
