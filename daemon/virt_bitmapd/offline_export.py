"""What an offline reader gets from a checkpoint: ``qemu-nbd -r --bitmap=NAME TOP``, as
virtnbdbackup's offline mode and OpenNebula run it.  Pure: no I/O.

libvirt's backup API merges a checkpoint's copies over the chain and refuses a disabled or
broken one.  ``qemu-nbd`` does neither (measured with QEMU 7.2): it exports the top-most copy of
the bitmap alone, disabled or not, from a backing file when the top has none, and refuses only a
bitmap that is nowhere in the chain or inconsistent.  So the same checkpoint can be safe for one
reader and short for the other, and ``status`` says what each does.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence

from .model import Image

__all__ = ["OfflineExport", "offline_export"]


class OfflineExport(enum.Enum):
    """What an offline incremental backup from the checkpoint does next."""

    SAFE = "safe"
    WHOLE_DISK = "complete: the whole disk"
    REFUSED = "refused by qemu-nbd"
    MISSES_DATA = "would miss data"
    NONE = "no checkpoint"
    AFTER_JOB = "judged when the job ends"


def offline_export(
    chain: Sequence[Image],
    bitmap: str,
    *,
    untrusted: bool,
    filled: bool,
    valid: bool,
    top_united: bool,
) -> tuple[OfflineExport, str]:
    """What exporting ``bitmap`` of ``chain``'s top (top first) gives, and why when it is not
    safe.  ``untrusted``: virt-bitmapd cannot prove its bits complete; ``filled``: it set every
    bit; ``valid``: libvirt accepts its chain; ``top_united``: the top's copies were made to hold
    the copies below them for this very chain."""
    holder = next((image for image in chain if image.bitmap(bitmap) is not None), None)
    copy = None if holder is None else holder.bitmap(bitmap)
    if holder is None or copy is None:
        return OfflineExport.REFUSED, "no layer holds the bitmap"
    below = any(image.bitmap(bitmap) is not None for image in chain[1:])
    rules = (  # the first that holds decides
        (copy.inconsistent, OfflineExport.REFUSED, f"its copy in {holder.path} is inconsistent"),
        (
            holder is not chain[0],
            OfflineExport.MISSES_DATA,
            f"the top holds no copy: the copy in {holder.path} is exported, which misses what "
            "was written above it",
        ),
        (
            not copy.recording,
            OfflineExport.MISSES_DATA,
            f"its copy in {holder.path} is disabled and exported all the same, without what "
            "was written since",
        ),
        (untrusted, OfflineExport.MISSES_DATA, "virt-bitmapd cannot prove its bits complete"),
        (filled, OfflineExport.WHOLE_DISK, ""),
        (
            below and not (valid and top_united),
            OfflineExport.MISSES_DATA,
            "only the top's copy is exported, and nothing shows it holds the copies below it "
            "(virt-bitmapd merges them after each change of the chain)",
        ),
    )
    return next(((verdict, why) for hit, verdict, why in rules if hit), (OfflineExport.SAFE, ""))
