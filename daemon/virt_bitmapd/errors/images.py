"""Errors about a chain or one image: the message starts with what it is about."""

from __future__ import annotations

from .base import VirtBitmapdError


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


class FillFailed(ImageError):
    """Untrusted bitmaps could not be given every bit: they are disabled instead, where the
    policy allows it."""

    kind = "fill_failed"


class QuarantineFailed(ImageError):
    """Untrusted bitmaps could not be disabled: libvirt would still start an incremental backup
    from them, which may miss data."""

    kind = "quarantine_failed"


class CommitUnverifiable(ImageError):
    """QEMU may not open a committed layer (libvirt's AppArmor or SELinux confinement revokes
    its access once the commit ends), while the base already shows every bitmap the commit
    concerns: libvirt's own merge cannot be checked bit by bit, and nothing needs adding."""

    kind = "unverifiable"
