"""One family of errors, for the whole program.

Each class's name says what went wrong and its ``kind`` (used in metric labels, logs and JSON)
says the same in snake case.  Each message names the image, bitmap or domain it is about.
``retryable`` says whether trying the same thing later may succeed; it follows the cause (a lock
held by another process, a tool that did not answer in time), so a few classes decide it per
instance.  What QEMU's tools say is turned into these by ``qemu_messages``.
"""

from __future__ import annotations

__all__ = [
    "BaseCannotHoldBitmaps",
    "BaseChanged",
    "BitmapUnusableAfter",
    "BitsUnrecoverable",
    "ChainError",
    "ChainMoving",
    "CleanupFailed",
    "CommitUnverifiable",
    "CommittedLayersGone",
    "CrashDamagedBitmaps",
    "DomainXMLInvalid",
    "ImageCorrupt",
    "ImageError",
    "ImageInUse",
    "ImageMissing",
    "ImageUnreadable",
    "LibvirtFailed",
    "NoSpace",
    "OutsideStorageRoots",
    "QMPError",
    "QuarantineFailed",
    "RepairRefused",
    "StateUnusable",
    "ToolCrashed",
    "ToolFailed",
    "TransactionRefused",
    "UnseenLayersForked",
    "VirtBitmapdError",
]


class VirtBitmapdError(Exception):
    """Root of every error virt-bitmapd raises on purpose."""

    #: Whether trying the same thing again later may succeed.
    retryable: bool = False
    #: Short machine-readable kind, used in metrics labels and JSON output.
    kind: str = "error"

    def __str__(self) -> str:
        # Notes added on the way up (a tool's own words) belong to the message users read.
        return "; ".join([super().__str__(), *getattr(self, "__notes__", ())])


# ------------------------------------------------------------------ chains and images


class ChainError(VirtBitmapdError):
    """TOP and BASE do not describe a commit in one backing chain, or the chain is malformed
    (a loop, an unrecorded backing format, a layer QEMU does not show)."""

    kind = "chain_error"


class ChainMoving(ChainError):
    """The chain changed each time it was read; the next look will find it settled."""

    kind = "chain_moving"
    retryable = True


class ImageError(VirtBitmapdError):
    """Something is wrong with one image; the message starts with its path."""

    kind = "image_error"

    def __init__(self, image: str, detail: str) -> None:
        super().__init__(f"{image}: {detail}")
        self.image = image


class ImageMissing(ImageError):
    kind = "image_missing"


class ImageCorrupt(ImageError):
    kind = "image_corrupt"


class ImageUnreadable(ImageError):
    kind = "image_unreadable"


class ImageInUse(ImageError):
    """Another process (usually a running QEMU) holds the image; change it only through that."""

    kind = "image_in_use"
    retryable = True


class NoSpace(ImageError):
    """The image's file system cannot take what a change needs; space may be freed later."""

    kind = "no_space"
    retryable = True


class OutsideStorageRoots(ImageError):
    kind = "outside_storage_roots"


class BaseCannotHoldBitmaps(ImageError):
    """The commit base is not qcow2, so it cannot carry checkpoint bitmaps."""

    kind = "base_cannot_hold_bitmaps"

    def __init__(self, base: str, image_format: str, bitmaps: tuple[str, ...] = ()) -> None:
        names = ", ".join(repr(name) for name in bitmaps)
        super().__init__(
            base,
            f"the commit base is {image_format}, not qcow2, and cannot hold bitmaps"
            + (
                f"; {names} cannot be carried: the next backup of each must be full"
                if names
                else ""
            ),
        )
        self.bitmaps = bitmaps


# ------------------------------------------------------------------ changing a base


class TransactionRefused(ImageError):
    """QEMU refused the bitmap transaction; being a transaction, it changed nothing."""

    kind = "transaction_refused"

    def __init__(self, base: str, description: str) -> None:
        super().__init__(
            base, f"QEMU refused the bitmap transaction, nothing was changed: {description}"
        )


class BaseChanged(ImageError):
    """The base's bitmaps differ from those the plan was made from; nothing was changed."""

    kind = "base_changed"
    retryable = True

    def __init__(self, base: str, bitmap: str, what: str) -> None:
        super().__init__(
            base, f"bitmap {bitmap!r} {what} since the chain was read; nothing was changed"
        )
        self.bitmap = bitmap


class BitmapUnusableAfter(ImageError):
    """After the transaction, a merged bitmap is not recording and consistent in the base."""

    kind = "bitmap_unusable_after"

    def __init__(self, base: str, bitmap: str) -> None:
        super().__init__(
            base,
            f"bitmap {bitmap!r} is not recording and consistent after the transaction; "
            "the next backup from it must be full",
        )
        self.bitmap = bitmap


class RepairRefused(ImageError):
    """A live repair that could change what the guest reads is not attempted."""

    kind = "repair_refused"


class QuarantineFailed(ImageError):
    """Untrusted bitmaps could not be disabled: libvirt would still start an incremental backup
    from them, which may miss data."""

    kind = "quarantine_failed"


class CommitUnverifiable(ImageError):
    """QEMU may not open a committed layer (libvirt's AppArmor or SELinux confinement revokes
    its access once the commit ends), while the base already shows every bitmap the commit
    concerns: libvirt's own merge cannot be checked bit by bit, and nothing needs adding."""

    kind = "unverifiable"


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


class CleanupFailed(VirtBitmapdError):
    """Temporary nodes or probe bitmaps could not be removed from a running QEMU (or its base
    put back read-only); the daemon removes its leftovers when it next connects."""

    kind = "cleanup_failed"
    retryable = True

    def __init__(self, domain: str, failures: list[str]) -> None:
        super().__init__(f"{domain}: cleanup after the check failed: {'; '.join(failures)}")
        self.failures = tuple(failures)


# ------------------------------------------------------------------ tools and services


class ToolFailed(VirtBitmapdError):
    """A QEMU tool could not be run or did not answer as expected.  A tool that is missing will
    still be missing later; one that timed out or died may do better next time."""

    kind = "tool_failed"

    def __init__(self, message: str, *, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


class ToolCrashed(ToolFailed):
    """A QEMU tool ended by a signal (an abort, a kill) in the middle of its work."""

    kind = "tool_crashed"


class CrashDamagedBitmaps(BitsUnrecoverable):
    """A tool that had the base open read-write died, leaving bitmaps that were good before
    flagged in-use: libvirt refuses backups from them, and their next backup must be full."""

    kind = "crash_damaged_bitmaps"

    def __init__(self, base: str, crash: str, bitmaps: tuple[str, ...]) -> None:
        super().__init__(
            base, f"{crash}; it had the base open, and these bitmaps were left unusable", bitmaps
        )


class QMPError(VirtBitmapdError):
    """QEMU answered a QMP command with an error."""

    kind = "qmp_error"

    def __init__(self, command: str, description: str) -> None:
        super().__init__(f"{command}: {description}")
        self.command = command
        self.description = description


class LibvirtFailed(VirtBitmapdError):
    """libvirtd refused a call or went away; the next look may succeed."""

    kind = "libvirt_failed"
    retryable = True


class DomainXMLInvalid(VirtBitmapdError):
    """libvirt answered with XML that is not a domain description."""

    kind = "domain_xml_invalid"


class StateUnusable(VirtBitmapdError):
    """The state directory cannot be read or written."""

    kind = "state_unusable"
    retryable = True
