"""One family of errors, for the whole program.

Each class's name says what went wrong and its ``kind`` (used in metric labels, logs and JSON)
says the same in snake case.  Each message names the image, bitmap or domain it is about.
``retryable`` says whether trying the same thing later may succeed; it follows the cause (a lock
held by another process, a tool that did not answer in time), so a few classes decide it per
instance.  What QEMU's tools say is turned into these by ``qemu_messages``.

``base`` holds the root; ``images`` what is wrong with a chain or an image; ``bits`` what a
commit could not carry (the bitmaps named are untrusted); ``services`` the tools, libvirtd and
the state directory.
"""

from __future__ import annotations

from .base import VirtBitmapdError
from .bits import (
    BitsUnrecoverable,
    CommittedLayersGone,
    CommitUnproven,
    CrashDamagedBitmaps,
    UnseenLayersForked,
)
from .images import (
    BaseCannotHoldBitmaps,
    BaseChanged,
    BitmapUnusableAfter,
    ChainError,
    ChainMoving,
    CommitUnverifiable,
    FillFailed,
    ImageCorrupt,
    ImageError,
    ImageInUse,
    ImageMissing,
    ImageUnreadable,
    NoSpace,
    OutsideStorageRoots,
    QuarantineFailed,
    RepairRefused,
    TransactionRefused,
)
from .services import (
    CleanupFailed,
    DomainXMLInvalid,
    LibvirtFailed,
    QMPError,
    StateUnusable,
    ToolCrashed,
    ToolFailed,
)

__all__ = [
    "BaseCannotHoldBitmaps",
    "BaseChanged",
    "BitmapUnusableAfter",
    "BitsUnrecoverable",
    "ChainError",
    "ChainMoving",
    "CleanupFailed",
    "CommitUnproven",
    "CommitUnverifiable",
    "CommittedLayersGone",
    "CrashDamagedBitmaps",
    "DomainXMLInvalid",
    "FillFailed",
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
