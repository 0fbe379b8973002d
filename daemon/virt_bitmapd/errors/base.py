"""The root of virt-bitmapd's errors."""

from __future__ import annotations

__all__ = ["VirtBitmapdError"]


class VirtBitmapdError(Exception):
    """Root of every error virt-bitmapd raises on purpose."""

    #: Whether trying the same thing again later may succeed.
    retryable: bool = False
    #: Short machine-readable kind, used in metrics labels and JSON output.
    kind: str = "error"

    def __str__(self) -> str:
        # Notes added on the way up (a tool's own words) belong to the message users read.
        return "; ".join([super().__str__(), *getattr(self, "__notes__", ())])
