"""Plain value types shared by the whole program.

A Chain lists images from the top (the layer guests write to, or the commit top) down to the
end of the backing chain.  A Plan is what must happen to the commit base so that it carries every
valid checkpoint bitmap of the committed layers; it is data, computed by ``planner.plan`` and
executed elsewhere.  Every type checks itself when built, so a value that exists is coherent.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

__all__ = [
    "Bitmap",
    "BitmapMerge",
    "Chain",
    "Image",
    "MergeOutcome",
    "Outcome",
    "Plan",
    "Reconciliation",
    "Result",
    "Skip",
    "SkipReason",
    "find_bitmap",
]

MIN_GRANULARITY = 512
MAX_GRANULARITY = 1 << 31
QCOW2 = "qcow2"


def _is_power_of_two(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


@dataclass(frozen=True, slots=True, kw_only=True)
class Bitmap:
    """One dirty bitmap as stored in one image."""

    name: str
    granularity: int
    recording: bool
    persistent: bool = True
    inconsistent: bool = False

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("a bitmap needs a name")
        if not (
            _is_power_of_two(self.granularity)
            and MIN_GRANULARITY <= self.granularity <= MAX_GRANULARITY
        ):
            raise ValueError(
                f"bitmap {self.name!r}: granularity {self.granularity} is not a power of two "
                f"between {MIN_GRANULARITY} and {MAX_GRANULARITY}"
            )

    @property
    def usable(self) -> bool:
        """Whether this copy can carry a checkpoint (libvirt's per-copy rule)."""
        return self.recording and self.persistent and not self.inconsistent


@dataclass(frozen=True, slots=True, kw_only=True)
class Image:
    """One layer of a backing chain."""

    path: str
    format: str
    virtual_size: int = 0
    bitmaps: tuple[Bitmap, ...] = ()

    def __post_init__(self) -> None:
        if not self.path:
            raise ValueError("an image needs a path")
        names = [bitmap.name for bitmap in self.bitmaps]
        if len(set(names)) != len(names):
            raise ValueError(f"image {self.path}: bitmap names repeat: {names}")
        if self.bitmaps and self.format != QCOW2:
            raise ValueError(f"image {self.path}: a {self.format} image cannot hold bitmaps")

    @property
    def can_hold_bitmaps(self) -> bool:
        return self.format == QCOW2

    def bitmap(self, name: str) -> Bitmap | None:
        return find_bitmap(self.bitmaps, name)


def find_bitmap(bitmaps: Iterable[Bitmap], name: str) -> Bitmap | None:
    """The bitmap called ``name`` among ``bitmaps`` (one image's or one node's), if any."""
    return next((bitmap for bitmap in bitmaps if bitmap.name == name), None)


@dataclass(frozen=True, slots=True)
class Chain:
    """A backing chain, top first.  Paths are unique."""

    images: tuple[Image, ...]

    def __post_init__(self) -> None:
        if not self.images:
            raise ValueError("a chain needs at least one image")
        paths = [image.path for image in self.images]
        if len(set(paths)) != len(paths):
            raise ValueError(f"a chain cannot hold an image twice: {paths}")

    def __iter__(self) -> Iterator[Image]:
        return iter(self.images)

    def __len__(self) -> int:
        return len(self.images)

    @property
    def top(self) -> Image:
        return self.images[0]

    def index_of(self, path: str) -> int | None:
        for index, image in enumerate(self.images):
            if image.path == path:
                return index
        return None


class SkipReason(enum.Enum):
    """Why a bitmap is left alone; the value is what users read."""

    NOT_IN_TOP = "not in the top image"
    DISABLED = "disabled (not recording)"
    INCONSISTENT = "inconsistent (not saved cleanly)"
    NOT_PERSISTENT = "not persistent"
    GAP = "gap in the bitmap's chain"


@dataclass(frozen=True, slots=True, kw_only=True)
class Skip:
    """A bitmap the plan leaves alone, and the image where the reason was found."""

    bitmap: str
    image: str
    reason: SkipReason


@dataclass(frozen=True, slots=True, kw_only=True)
class BitmapMerge:
    """Carry one checkpoint bitmap into the base: create it there if missing, then OR in sources.

    ``sources`` are image paths, topmost first, all holding the bitmap under the same name.
    """

    bitmap: str
    granularity: int
    create_in_base: bool
    sources: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.sources:
            raise ValueError(f"bitmap {self.bitmap!r}: a merge needs at least one source")


@dataclass(frozen=True, slots=True, kw_only=True)
class Plan:
    """What the commit base needs.  Applying a plan twice changes nothing the second time."""

    top: str
    base: str
    merges: tuple[BitmapMerge, ...] = ()
    skipped: tuple[Skip, ...] = field(default=())

    def __post_init__(self) -> None:
        for merge in self.merges:
            if self.base in merge.sources:
                raise ValueError(f"bitmap {merge.bitmap!r}: the base cannot be its own source")

    @property
    def is_empty(self) -> bool:
        return not self.merges

    def first_unusable(self, base_bitmaps: Iterable[Bitmap]) -> str | None:
        """The first merged bitmap that ``base_bitmaps`` (the base after applying this plan)
        lack, or hold but not recording and consistent; None when all are fine."""
        usable = {bitmap.name for bitmap in base_bitmaps if bitmap.usable}
        return next((m.bitmap for m in self.merges if m.bitmap not in usable), None)

    def mismatch(self, base_bitmaps: Iterable[Bitmap]) -> tuple[str, str] | None:
        """The first merge that ``base_bitmaps`` (the base just before applying this plan) no
        longer fit, and how; None when the base is as the plan assumed."""
        present = {bitmap.name: bitmap for bitmap in base_bitmaps}
        for merge in self.merges:
            copy = present.get(merge.bitmap)
            if merge.create_in_base and copy is not None:
                return merge.bitmap, "appeared"
            if not merge.create_in_base and copy is None:
                return merge.bitmap, "is gone"
            if not merge.create_in_base and copy is not None and not copy.usable:
                return merge.bitmap, "is no longer recording and consistent"
        return None

    @property
    def source_images(self) -> tuple[str, ...]:
        """Every image the merges read, in chain order (topmost first), once each."""
        seen: dict[str, None] = {}
        for merge in self.merges:
            for source in merge.sources:
                seen.setdefault(source, None)
        return tuple(seen)


@dataclass(frozen=True, slots=True, kw_only=True)
class MergeOutcome:
    """What one BitmapMerge did to the base, from QEMU's own dirty counts."""

    bitmap: str
    created: bool
    dirty_bytes_before: int
    dirty_bytes_after: int

    @property
    def changed(self) -> bool:
        return self.created or self.dirty_bytes_after != self.dirty_bytes_before


@dataclass(frozen=True, slots=True, kw_only=True)
class Outcome:
    """A plan as applied."""

    plan: Plan
    merges: tuple[MergeOutcome, ...]

    @classmethod
    def from_counts(
        cls, plan: Plan, before: Mapping[str, int], after: Mapping[str, int]
    ) -> Outcome:
        """From the base's dirty byte counts per bitmap, before and after the transaction."""
        return cls(
            plan=plan,
            merges=tuple(
                MergeOutcome(
                    bitmap=merge.bitmap,
                    created=merge.create_in_base,
                    dirty_bytes_before=before.get(merge.bitmap, 0),
                    dirty_bytes_after=after.get(merge.bitmap, 0),
                )
                for merge in plan.merges
            ),
        )

    @property
    def changed(self) -> bool:
        return any(merge.changed for merge in self.merges)


class Result(enum.Enum):
    """How a reconciliation ended without an error; the value is what users read."""

    NOTHING_TO_DO = "nothing to do"
    PLANNED = "planned"
    RECONCILED = "reconciled"
    ALREADY_CONSISTENT = "already consistent"


@dataclass(frozen=True, slots=True, kw_only=True)
class Reconciliation:
    """How one commit base was handled, at rest or live: the plan, how it ended, what changed."""

    plan: Plan
    result: Result
    outcome: Outcome | None = None
    #: The layers committed into the base (top first) that the plan covered.
    committed: tuple[str, ...] = ()
    #: Bitmaps left out because their bits cannot be proven (and why): never reported fine.
    untrusted: tuple[str, ...] = ()
    why_untrusted: str = ""
