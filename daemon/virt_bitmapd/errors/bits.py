"""Bits that cannot be carried: the bitmaps named must not be trusted, and the next backup of
each must be full."""

from __future__ import annotations

from .base import VirtBitmapdError


class BitsUnrecoverable(VirtBitmapdError):
    """What a commit took from the base's bitmaps cannot be known any more: nothing is changed,
    and backups from the bitmaps named must start with a full one."""

    kind = "unrecoverable"

    def __init__(self, base: str, why: str, bitmaps: tuple[str, ...]) -> None:
        names = ", ".join(repr(name) for name in bitmaps) or "none found"
        super().__init__(
            f"{base}: {why}; bitmaps that cannot be trusted: {names}; "
            "the next backup of each must be full"
        )
        self.image = base
        self.bitmaps = bitmaps


class CommittedLayersGone(BitsUnrecoverable):
    """The committed layers were deleted before their bitmaps reached the base."""

    kind = "committed_layers_gone"

    def __init__(self, base: str, missing: tuple[str, ...], bitmaps: tuple[str, ...]) -> None:
        super().__init__(
            base,
            f"committed layer(s) {', '.join(missing)} are gone, so the bits they held cannot be "
            "proven to be in the base",
            bitmaps,
        )
        self.missing = missing


class UnseenLayersForked(BitsUnrecoverable):
    """Layers made since the last look back onto the committed top, and which of them were
    committed with it cannot be told (several made on one layer, or one that does not continue
    the top's bitmaps)."""

    kind = "unseen_layers_forked"

    def __init__(
        self,
        base: str,
        top: str,
        candidates: tuple[str, ...],
        bitmaps: tuple[str, ...],
        *,
        why: str = "",
    ) -> None:
        super().__init__(
            base,
            f"layers made since the last look back onto the committed {top} "
            f"({', '.join(candidates)}) and which of them went into the base cannot be told"
            + (f": {why}" if why else ""),
            bitmaps,
        )
        self.candidates = candidates


class CrashDamagedBitmaps(BitsUnrecoverable):
    """A tool that had the base open read-write died, leaving bitmaps that were good before
    flagged in-use: libvirt refuses backups from them, and their next backup must be full."""

    kind = "crash_damaged_bitmaps"

    def __init__(self, base: str, crash: str, bitmaps: tuple[str, ...]) -> None:
        super().__init__(
            base, f"{crash}; it had the base open, and these bitmaps were left unusable", bitmaps
        )


class CommitUnproven(BitsUnrecoverable):
    """Layers left the chain and nothing proves they were committed into the base (libvirt's
    event, a record of `virt-bitmapd reconcile`, the base written since the last look while
    the domain did not start).  Discarded instead (a revert), they took with them the content of
    every cluster they held, written before any checkpoint or after: no bitmap says which."""

    kind = "commit_unproven"

    def __init__(
        self, base: str, removed: tuple[str, ...], why: str, bitmaps: tuple[str, ...]
    ) -> None:
        super().__init__(
            base,
            f"nothing proves {', '.join(removed)} were committed into it ({why}); discarded "
            "instead, they changed every cluster they held",
            bitmaps,
        )
        self.removed = removed
        self.why = why
