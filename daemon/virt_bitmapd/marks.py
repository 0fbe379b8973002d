"""Where things stood as a look at a disk ended: what the next look compares with to prove what
happened in between.

Each layer's stat as the look left it (its own writes included, so only someone else's write
shows as a change) and where the domain's QEMU log ended as the look began (a start since shows
there).  Kept in the state directory with every look that saves the disk's chain, whether or not
the look proved everything (the fingerprint is kept only then).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .fingerprints import LayerStat, identities, stat_fields, stat_from_json
from .readers.qemu_log import LogMark

__all__ = ["Marks"]


@dataclass(frozen=True, slots=True)
class Marks:
    #: layer path -> its stat as the look left it (None: it could not be stat'ed)
    layers: Mapping[str, LayerStat] = field(default_factory=dict)
    #: where the domain's QEMU log ended (None: not known)
    qemu_log: LogMark | None = None

    def identities(self) -> dict[str, tuple[int, int]]:
        """Each layer's (device, inode): which file each path named."""
        return identities(self.layers)

    def to_json(self) -> dict[str, Any]:
        log = self.qemu_log
        return {
            "layers": {
                path: None if stat is None else list(stat_fields(stat))
                for path, stat in sorted(self.layers.items())
            },
            "qemu_log": None if log is None else [log.device, log.inode, log.size, log.tail.hex()],
        }

    @classmethod
    def from_json(cls, raw: Any) -> Marks:
        """Raises KeyError, TypeError or ValueError on another shape."""
        layers = {str(path): stat_from_json(stat) for path, stat in raw["layers"].items()}
        log = raw.get("qemu_log")
        if log is not None:
            device, inode, size, tail = log
            log = LogMark(int(device), int(inode), int(size), bytes.fromhex(tail))
        return cls(layers, log)
