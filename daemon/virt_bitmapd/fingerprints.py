"""What a rescan compares before it reads anything heavier: a ``stat`` per layer.

A look reads a disk's images (``qemu-img``, their headers) or QEMU's node data, and libvirt's
checkpoints. A rescan only needs to when something may have changed since the last look: a
layer's stat (device, inode, size, modification and change times; the change time cannot be set
back by anyone), the running domain's chain in its XML, or its list of checkpoints. A look takes
the stats *before* it reads, so a change made while it reads shows at the next rescan.
"""

from __future__ import annotations

import os
import struct
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .model import Bitmap, Image

__all__ = [
    "Fingerprint",
    "LayerStat",
    "change_time_ns",
    "identities",
    "left_as_they_were",
    "pack_stat",
    "stat_fields",
    "stat_from_json",
    "stat_layer",
    "stat_layers",
    "strings_from_json",
    "unchanged",
]

#: (device, inode, size, mtime ns, ctime ns), packed: a host's every layer is remembered, and
#: 40 bytes cost a third of five Python ints in a tuple. None when the layer cannot be stat'ed.
LayerStat = bytes | None
_PACKED = struct.Struct("<QQQqq")


def pack_stat(device: int, inode: int, size: int, mtime_ns: int, ctime_ns: int) -> bytes:
    return _PACKED.pack(device, inode, size, mtime_ns, ctime_ns)


def stat_fields(stat: bytes) -> tuple[int, int, int, int, int]:
    """(device, inode, size, mtime ns, ctime ns)"""
    device, inode, size, mtime_ns, ctime_ns = _PACKED.unpack(stat)
    return device, inode, size, mtime_ns, ctime_ns


def change_time_ns(stat: bytes) -> int:
    return stat_fields(stat)[4]


def stat_layer(path: str) -> LayerStat:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return pack_stat(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def stat_layers(paths: Iterable[str]) -> dict[str, LayerStat]:
    return {path: stat_layer(path) for path in paths}


@dataclass(frozen=True, slots=True)
class Fingerprint:
    """What one complete look at a disk saw, for the next rescan to compare."""

    chain: tuple[str, ...]
    stats: tuple[LayerStat, ...]
    #: the domain's checkpoint names (running domains: libvirt adds a checkpoint's bitmap in
    #: QEMU, which writes it to the image only when it closes it)
    checkpoints: tuple[str, ...] | None = None
    #: each layer's format and virtual size (empty when not remembered)
    formats: tuple[str, ...] = ()
    sizes: tuple[int, ...] = ()

    @classmethod
    def of(
        cls,
        images: Sequence[Image],
        stats_before: Mapping[str, LayerStat],
        checkpoints: tuple[str, ...] | None,
    ) -> Fingerprint | None:
        """None when a layer was not stat'ed before the look read it (one found on the way):
        then nothing proves the next rescan may skip the disk."""
        chain = tuple(image.path for image in images)
        if any(stats_before.get(path) is None for path in chain):
            return None
        return cls(
            chain,
            tuple(stats_before[path] for path in chain),
            checkpoints,
            tuple(sys.intern(image.format) for image in images),  # one "qcow2" for all
            tuple(image.virtual_size for image in images),
        )

    @classmethod
    def from_json(cls, raw: Any) -> Fingerprint:
        """As the state directory keeps it; raises KeyError, TypeError or ValueError on
        another shape."""
        checkpoints = raw.get("checkpoints")
        chain = strings_from_json(raw["chain"])
        stats = tuple(stat_from_json(item) for item in raw["stats"])
        if len(stats) != len(chain):
            raise ValueError(f"{len(stats)} stats for a chain of {len(chain)} layers")
        return cls(
            chain,
            stats,
            None if checkpoints is None else strings_from_json(checkpoints),
            strings_from_json(raw.get("formats", [])),
            tuple(int(size) for size in raw.get("sizes", [])),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "chain": list(self.chain),
            "stats": [None if s is None else list(stat_fields(s)) for s in self.stats],
            "checkpoints": None if self.checkpoints is None else list(self.checkpoints),
            "formats": list(self.formats),
            "sizes": list(self.sizes),
        }

    def identities(self) -> dict[str, tuple[int, int]]:
        """Each layer's (device, inode) as stat'ed: which file each path named."""
        return identities(dict(zip(self.chain, self.stats, strict=True)))

    def images(self, bitmaps: Mapping[str, tuple[Bitmap, ...]]) -> tuple[Image, ...] | None:
        """The chain as that look saw it, with ``bitmaps`` per layer; None when its formats
        and sizes were not remembered."""
        if len(self.formats) != len(self.chain) or len(self.sizes) != len(self.chain):
            return None
        return tuple(
            Image(path=path, format=fmt, virtual_size=size, bitmaps=bitmaps.get(path, ()))
            for path, fmt, size in zip(self.chain, self.formats, self.sizes, strict=True)
        )


def unchanged(
    fingerprint: Fingerprint,
    *,
    chain: tuple[str, ...] | None,
    checkpoints: tuple[str, ...] | None,
    stats: Mapping[str, LayerStat],
) -> bool:
    """Whether nothing says the disk changed since ``fingerprint``: the chain (None: not read, a
    shut-off domain's XML changes only with an event) and the checkpoints (None: not read) as
    they were, and every layer's stat the same."""
    if chain is not None and chain != fingerprint.chain:
        return False
    if checkpoints is not None and checkpoints != fingerprint.checkpoints:
        return False
    return all(
        stats.get(path) == stat
        for path, stat in zip(fingerprint.chain, fingerprint.stats, strict=True)
    )


def identities(stats: Mapping[str, LayerStat]) -> dict[str, tuple[int, int]]:
    """Each path's (device, inode) as stat'ed (those that could be): which file it named."""
    return {path: stat_fields(stat)[:2] for path, stat in stats.items() if stat is not None}


def left_as_they_were(stats: Mapping[str, LayerStat]) -> bool:
    """Whether every layer in ``stats`` (at least one) has that stat still."""
    return bool(stats) and all(stat_layer(path) == stat for path, stat in stats.items())


def strings_from_json(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise TypeError(f"expected a list of strings, got {value!r:.80}")
    return tuple(value)


def stat_from_json(raw: Any) -> LayerStat:
    """A stat as ``Fingerprint.to_json`` writes it (a list of five numbers, or null)."""
    if raw is None:
        return None
    dev, ino, size, mtime, ctime = (int(n) for n in raw)
    return pack_stat(dev, ino, size, mtime, ctime)
