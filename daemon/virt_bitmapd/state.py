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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import StateUnusable
from .fingerprints import LayerStat, Seen, pack_stat, stat_fields
from .health import Distrust
from .model import Bitmap

__all__ = ["Distrust", "DomainState", "StateStore"]

FORMAT_VERSION = 1
#: Why a bitmap remembered untrusted by a version that kept no reason is so.
NO_REASON_KEPT = "a commit could not carry its bits (remembered without a reason)"


@dataclass(slots=True)
class DomainState:
    uuid: str
    name: str
    #: disk target -> chain paths, top first
    chains: dict[str, tuple[str, ...]] = field(default_factory=dict)
    #: disk target -> bitmap -> why its bits could not be proven complete
    untrusted: dict[str, dict[str, Distrust]] = field(default_factory=dict)
    #: disk target -> layer path -> its bitmaps when last seen (what a base held before a commit)
    bitmaps: dict[str, dict[str, tuple[Bitmap, ...]]] = field(default_factory=dict)
    #: disk target -> when (time.time()) the look that saw that chain began
    seen_at: dict[str, float] = field(default_factory=dict)
    #: disk target -> layer -> the layer it was seen committed into, its bits carried: proof
    #: that a checkpoint taken on a layer now gone lives on below (see health.lost_layers)
    merged_into: dict[str, dict[str, str]] = field(default_factory=dict)
    #: disk target -> what its last complete look saw (stats, checkpoints): a look may trust
    #: the bitmaps above instead of reading the images while nothing says they changed
    seen: dict[str, Seen] = field(default_factory=dict)


def _bitmaps_from_json(raw: Mapping[str, list[dict[str, Any]]]) -> dict[str, tuple[Bitmap, ...]]:
    return {str(path): tuple(Bitmap(**item) for item in items) for path, items in raw.items()}


def _distrust_from_json(raw: Any) -> dict[str, Distrust]:
    if isinstance(raw, list):  # names only, as the first releases wrote
        return {name: Distrust(NO_REASON_KEPT) for name in _strings(raw)}
    if not isinstance(raw, dict):
        raise TypeError(f"expected an object of untrusted bitmaps, got {raw!r:.80}")
    return {
        str(name): Distrust(str(item["why"]), int(item.get("checkpoint_created", 0)))
        for name, item in raw.items()
    }


def _seen_from_json(raw: Any) -> Seen:
    checkpoints = raw.get("checkpoints")
    chain = _strings(raw["chain"])
    stats = tuple(_layer_stat(item) for item in raw["stats"])
    if len(stats) != len(chain):
        raise ValueError(f"{len(stats)} stats for a chain of {len(chain)} layers")
    formats = _strings(raw.get("formats", []))
    sizes = tuple(int(size) for size in raw.get("sizes", []))
    return Seen(
        chain, stats, None if checkpoints is None else _strings(checkpoints), formats, sizes
    )


def _layer_stat(raw: Any) -> LayerStat:
    if raw is None:
        return None
    dev, ino, size, mtime, ctime = (int(n) for n in raw)
    return pack_stat(dev, ino, size, mtime, ctime)


def _strings(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise TypeError(f"expected a list of strings, got {value!r:.80}")
    return tuple(value)


def _state_from_json(uuid: str, raw: Any) -> DomainState:
    """A DomainState from a parsed file; raises KeyError, TypeError or ValueError when the
    document does not have the shape this version writes."""
    if not isinstance(raw, dict):
        raise TypeError("the document is not an object")
    if raw.get("version", FORMAT_VERSION) != FORMAT_VERSION:
        raise ValueError(f"version {raw.get('version')!r} is not {FORMAT_VERSION}")
    return DomainState(
        uuid=uuid,
        name=str(raw["name"]),
        chains={str(disk): _strings(chain) for disk, chain in raw["chains"].items()},
        untrusted={
            str(disk): _distrust_from_json(names)
            for disk, names in raw.get("untrusted", {}).items()
        },
        bitmaps={
            str(disk): _bitmaps_from_json(layers) for disk, layers in raw.get("bitmaps", {}).items()
        },
        seen_at={str(disk): float(when) for disk, when in raw.get("seen_at", {}).items()},
        merged_into={
            str(disk): {str(layer): str(base) for layer, base in layers.items()}
            for disk, layers in raw.get("merged_into", {}).items()
        },
        seen={str(disk): _seen_from_json(seen) for disk, seen in raw.get("seen", {}).items()},
    )


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
            return _state_from_json(uuid, raw)
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
        seen_at: float | None = None,
        generation: int = 0,
        merged_into: Mapping[str, str] | None = None,
        seen: Seen | None = None,
    ) -> bool:
        """Store one disk's chain; False (nothing written) when the domain was forgotten since
        ``generation`` was read. ``seen``: what the look saw, if it may spare the next one
        reading the images (None forgets an earlier one)."""
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
            if seen_at is not None:
                state.seen_at[disk] = seen_at
            if seen is None:
                state.seen.pop(disk, None)
            else:
                state.seen[disk] = seen
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
                del state.chains[disk]
                state.untrusted.pop(disk, None)
                state.bitmaps.pop(disk, None)
                state.seen_at.pop(disk, None)
                state.merged_into.pop(disk, None)
                state.seen.pop(disk, None)
                self._save(state)

    def _save(self, state: DomainState) -> None:
        try:
            self._write(state)
        except OSError as error:
            raise StateUnusable(f"{self.directory}: cannot save the state: {error}") from error

    def _write(self, state: DomainState) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        document = {
            "version": FORMAT_VERSION,
            "name": state.name,
            "chains": {disk: list(chain) for disk, chain in sorted(state.chains.items())},
            "untrusted": {
                disk: {name: asdict(distrust) for name, distrust in sorted(names.items())}
                for disk, names in sorted(state.untrusted.items())
                if names
            },
            "bitmaps": {
                disk: {path: [asdict(b) for b in bitmaps] for path, bitmaps in layers.items()}
                for disk, layers in sorted(state.bitmaps.items())
            },
            "seen_at": dict(sorted(state.seen_at.items())),
            "merged_into": {
                disk: dict(sorted(layers.items()))
                for disk, layers in sorted(state.merged_into.items())
                if layers
            },
            "seen": {
                disk: {
                    "chain": list(seen.chain),
                    "stats": [None if s is None else list(stat_fields(s)) for s in seen.stats],
                    "checkpoints": None if seen.checkpoints is None else list(seen.checkpoints),
                    "formats": list(seen.formats),
                    "sizes": list(seen.sizes),
                }
                for disk, seen in sorted(state.seen.items())
            },
        }
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
