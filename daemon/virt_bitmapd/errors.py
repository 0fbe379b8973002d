"""One family of errors.  Each names what it is about and says whether a retry can help."""

from __future__ import annotations

import re

__all__ = [
    "BaseCannotHoldBitmaps",
    "BitsUnprovable",
    "ChainError",
    "CleanupFailed",
    "CommittedLayersGone",
    "DomainXMLInvalid",
    "ImageCorrupt",
    "ImageError",
    "ImageInUse",
    "ImageMissing",
    "ImageUnreadable",
    "LayersOutOfQemuReach",
    "LibvirtFailed",
    "NoSpace",
    "OutsideStorageRoots",
    "QMPError",
    "ReconcileFailed",
    "StateUnusable",
    "ToolFailed",
    "UnseenLayersUnclear",
    "VirtBitmapdError",
    "image_error_from_qemu",
]


class VirtBitmapdError(Exception):
    """Root of every error virt-bitmapd raises on purpose."""

    #: Whether trying the same thing again later may succeed.
    retryable: bool = False
    #: Short machine-readable kind, used in metrics labels and JSON output.
    kind: str = "error"


class ChainError(VirtBitmapdError):
    """TOP and BASE do not describe a commit in one backing chain."""

    kind = "bad_chain"


class BaseCannotHoldBitmaps(VirtBitmapdError):
    """The commit base is not qcow2, so it cannot carry checkpoint bitmaps."""

    kind = "base_not_qcow2"

    def __init__(self, base: str, image_format: str, bitmaps: tuple[str, ...] = ()) -> None:
        names = ", ".join(repr(name) for name in bitmaps)
        super().__init__(
            f"{base}: the commit base is {image_format}, not qcow2, and cannot hold bitmaps"
            + (
                f"; {names} cannot be carried: the next backup of each must be full"
                if names
                else ""
            )
        )
        self.image = base
        self.bitmaps = bitmaps


class ImageError(VirtBitmapdError):
    """Something is wrong with one image."""

    def __init__(self, image: str, detail: str) -> None:
        super().__init__(f"{image}: {detail}")
        self.image = image
        self.detail = detail


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


class LayersOutOfQemuReach(ImageError):
    """QEMU may not open a committed layer (libvirt's AppArmor or SELinux confinement revokes
    its access once the commit ends), while the base already shows every bitmap the commit
    concerns: libvirt's own merge cannot be checked bit by bit, and nothing needs adding."""

    kind = "unverifiable"


class ToolFailed(VirtBitmapdError):
    """A QEMU tool could not be run or did not answer as expected."""

    kind = "tool_failed"
    retryable = True


class ReconcileFailed(VirtBitmapdError):
    """The transaction was refused; nothing was changed."""

    kind = "reconcile_failed"

    def __init__(self, message: str, *, image: str | None = None, bitmap: str | None = None):
        super().__init__(message)
        self.image = image
        self.bitmap = bitmap

    @classmethod
    def transaction_refused(cls, base: str, description: str) -> ReconcileFailed:
        return cls(
            f"{base}: QEMU refused the bitmap transaction, nothing was changed: {description}",
            image=base,
        )

    @classmethod
    def not_usable_after(cls, base: str, bitmap: str) -> ReconcileFailed:
        return cls(
            f"{base}: bitmap {bitmap!r} is not recording and consistent after the transaction; "
            "the next backup from it must be full",
            image=base,
            bitmap=bitmap,
        )


def _tidy_qemu_message(image: str, message: str) -> str:
    """QEMU repeats "Could not open 'X': " once per block layer; once is enough, and not at all
    when X is the image the error names already."""
    message = re.sub(r"(Could not open '[^']*': )\1+", r"\1", message.strip())
    own = f"Could not open '{image}': "
    return message[len(own) :] if message.startswith(own) else message


def image_error_from_qemu(image: str, message: str) -> ImageError:
    """Classify what a QEMU tool said when it could not open ``image``."""
    message = _tidy_qemu_message(image, message)
    lowered = message.lower()
    if "lock" in lowered and ("failed to get" in lowered or "another process" in lowered):
        return ImageInUse(image, "in use by another process (a running VM?): " + message)
    if "no such file or directory" in lowered:
        return ImageMissing(image, message)
    if "corrupt" in lowered or "invalid" in lowered or "not in qcow2 format" in lowered:
        return ImageCorrupt(image, message)
    return ImageUnreadable(image, message)


class BitsUnprovable(VirtBitmapdError):
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


class CommittedLayersGone(BitsUnprovable):
    """The committed layers were deleted before their bitmaps reached the base."""

    def __init__(self, base: str, missing: tuple[str, ...], bitmaps: tuple[str, ...]) -> None:
        super().__init__(
            base,
            f"committed layer(s) {', '.join(missing)} are gone, so the bits they held cannot be "
            "proven to be in the base",
            bitmaps,
        )
        self.missing = missing


class UnseenLayersUnclear(BitsUnprovable):
    """Layers made since the last look back onto the committed top, and more than one of them
    could have been committed with it: which bits the base needs cannot be told."""

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


class StateUnusable(VirtBitmapdError):
    """The state directory cannot be read or written."""

    kind = "state_unusable"
    retryable = True


class LibvirtFailed(VirtBitmapdError):
    """libvirtd refused a call or went away; the next look may succeed."""

    kind = "libvirt_failed"
    retryable = True


class DomainXMLInvalid(VirtBitmapdError):
    """libvirt answered with XML that is not a domain description."""

    kind = "domain_xml_invalid"


class CleanupFailed(VirtBitmapdError):
    """Temporary nodes or probe bitmaps could not be removed from a running QEMU (or its base
    put back read-only); the daemon removes its leftovers when it next connects."""

    kind = "cleanup_failed"
    retryable = True

    def __init__(self, domain: str, failures: list[str]) -> None:
        super().__init__(f"{domain}: cleanup after the check failed: {'; '.join(failures)}")
        self.failures = tuple(failures)


class QMPError(VirtBitmapdError):
    """QEMU answered a command with an error."""

    kind = "qmp_error"

    def __init__(self, command: str, description: str) -> None:
        super().__init__(f"{command}: {description}")
        self.command = command
        self.description = description
