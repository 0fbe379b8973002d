"""A domain's record in the state directory, and its JSON form.

What the last looks at each disk of a domain left: its chain, its bitmaps per layer, what is
distrusted and why, what was filled, where committed layers went, where checkpoints were taken,
what the last complete look saw. Every per-disk field is read, written and dropped through one
table.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from .filling import Filled
from .fingerprints import Fingerprint, strings_from_json
from .health import Distrust
from .marks import Marks
from .model import Bitmap

__all__ = [
    "FORMAT_VERSION",
    "NO_REASON_KEPT",
    "DomainState",
    "drop_disk",
    "state_from_json",
    "state_to_json",
]

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
    #: disk target -> bitmap -> what virt-bitmapd filled it for, and where (see filling)
    filled: dict[str, dict[str, Filled]] = field(default_factory=dict)
    #: disk target -> the chain whose top's copies were last made to hold the copies below
    #: (see top_union): a chain other than this one needs the union again
    united: dict[str, tuple[str, ...]] = field(default_factory=dict)
    #: disk target -> layer path -> its bitmaps when last seen (what a base held before a commit)
    bitmaps: dict[str, dict[str, tuple[Bitmap, ...]]] = field(default_factory=dict)
    #: disk target -> when (time.time()) the look that saw that chain began
    looked_at: dict[str, float] = field(default_factory=dict)
    #: disk target -> layer -> the layer it was seen committed into, its bits carried: proof
    #: that a checkpoint taken on a layer now gone lives on below (see lost_bits)
    merged_into: dict[str, dict[str, str]] = field(default_factory=dict)
    #: disk target -> checkpoint -> (its creationTime, the layer it was taken on), as libvirt
    #: said it while it did (see births)
    births: dict[str, dict[str, tuple[int, str]]] = field(default_factory=dict)
    #: disk target -> what its last complete look saw (stats, checkpoints): a look may trust
    #: the bitmaps above instead of reading the images while nothing says they changed
    fingerprints: dict[str, Fingerprint] = field(default_factory=dict)
    #: disk target -> where things stood as the last look that saved its chain ended (each
    #: layer's stat, the domain's QEMU log): what proves what happened since (``marks``)
    marks: dict[str, Marks] = field(default_factory=dict)


def _bitmaps_from_json(raw: Mapping[str, list[dict[str, Any]]]) -> dict[str, tuple[Bitmap, ...]]:
    return {str(path): tuple(Bitmap(**item) for item in items) for path, items in raw.items()}


def _distrust_from_json(raw: Any) -> dict[str, Distrust]:
    if isinstance(raw, list):  # names only, as the first releases wrote
        return {name: Distrust(NO_REASON_KEPT) for name in strings_from_json(raw)}
    if not isinstance(raw, dict):
        raise TypeError(f"expected an object of untrusted bitmaps, got {raw!r:.80}")
    return {
        str(name): Distrust(str(item["why"]), int(item.get("checkpoint_created", 0)))
        for name, item in raw.items()
    }


@dataclass(frozen=True, slots=True)
class _DiskField:
    """One per-disk field of DomainState: its key in the file, and how it is read and written
    (each of its values is per disk target)."""

    attribute: str
    key: str
    decode: Callable[[Any], Any]
    encode: Callable[[Any], Any]
    #: an empty value is left out of the file
    omit_empty: bool = False


_DISK_FIELDS = (
    _DiskField("chains", "chains", strings_from_json, list),
    _DiskField(
        "untrusted",
        "untrusted",
        _distrust_from_json,
        lambda names: {name: asdict(distrust) for name, distrust in sorted(names.items())},
        omit_empty=True,
    ),
    _DiskField(
        "filled",
        "filled",
        lambda fills: {str(name): Filled.from_json(item) for name, item in fills.items()},
        lambda fills: {name: fill.to_json() for name, fill in sorted(fills.items())},
        omit_empty=True,
    ),
    _DiskField("united", "united", strings_from_json, list, omit_empty=True),
    _DiskField(
        "bitmaps",
        "bitmaps",
        _bitmaps_from_json,
        lambda layers: {path: [asdict(b) for b in bitmaps] for path, bitmaps in layers.items()},
    ),
    _DiskField("looked_at", "seen_at", float, lambda when: when),
    _DiskField(
        "merged_into",
        "merged_into",
        lambda layers: {str(layer): str(base) for layer, base in layers.items()},
        lambda layers: dict(sorted(layers.items())),
        omit_empty=True,
    ),
    _DiskField("fingerprints", "seen", Fingerprint.from_json, Fingerprint.to_json),
    _DiskField(
        "births",
        "births",
        lambda births: {str(name): (int(at), str(layer)) for name, (at, layer) in births.items()},
        lambda births: {name: list(birth) for name, birth in sorted(births.items())},
        omit_empty=True,
    ),
    _DiskField("marks", "marks", Marks.from_json, Marks.to_json),
)


def state_from_json(uuid: str, raw: Any) -> DomainState:
    """A DomainState from a parsed file; raises KeyError, TypeError or ValueError when the
    document does not have the shape this version writes."""
    if not isinstance(raw, dict):
        raise TypeError("the document is not an object")
    if raw.get("version", FORMAT_VERSION) != FORMAT_VERSION:
        raise ValueError(f"version {raw.get('version')!r} is not {FORMAT_VERSION}")
    if "chains" not in raw:
        raise KeyError("chains")
    per_disk = {
        kind.attribute: {
            str(disk): kind.decode(value) for disk, value in raw.get(kind.key, {}).items()
        }
        for kind in _DISK_FIELDS
    }
    return DomainState(uuid=uuid, name=str(raw["name"]), **per_disk)


def state_to_json(state: DomainState) -> dict[str, Any]:
    document: dict[str, Any] = {"version": FORMAT_VERSION, "name": state.name}
    for kind in _DISK_FIELDS:
        document[kind.key] = {
            disk: kind.encode(value)
            for disk, value in sorted(getattr(state, kind.attribute).items())
            if value or not kind.omit_empty
        }
    return document


def drop_disk(state: DomainState, disk: str) -> None:
    """Every per-disk field of ``disk`` gone from ``state``."""
    for kind in _DISK_FIELDS:
        getattr(state, kind.attribute).pop(disk, None)
