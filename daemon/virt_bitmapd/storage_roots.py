"""The only places whose images virt-bitmapd may change."""

from __future__ import annotations

import os
from collections.abc import Sequence

from .errors import OutsideStorageRoots

__all__ = ["require_inside"]


def require_inside(path: str, roots: Sequence[str]) -> None:
    """Raise OutsideStorageRoots unless ``path``, symlinks resolved, lies under one of ``roots``."""
    real = os.path.realpath(path)
    for root in roots:
        real_root = os.path.realpath(root)
        if os.path.commonpath([real, real_root]) == real_root:
            return
    allowed = ", ".join(roots) if roots else "none configured"
    raise OutsideStorageRoots(real, f"outside the storage roots ({allowed}); not changed")
