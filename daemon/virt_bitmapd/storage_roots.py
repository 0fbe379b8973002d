"""The only places whose images virt-bitmapd may change, or search for layers it never saw.

Paths are compared with symlinks resolved and ``..`` collapsed, so neither a symlinked folder
inside a root nor a ``..`` in a name leads out of it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from .errors import OutsideStorageRoots

__all__ = ["is_inside", "require_inside", "root_problem"]


def is_inside(path: str, roots: Sequence[str]) -> bool:
    """Whether ``path``, symlinks resolved, lies under one of ``roots`` (also resolved)."""
    real = os.path.realpath(path)
    for root in roots:
        real_root = os.path.realpath(root)
        if real_root != "/" and os.path.commonpath([real, real_root]) == real_root:
            return True
    return False


def require_inside(path: str, roots: Sequence[str]) -> None:
    """Raise OutsideStorageRoots unless ``path``, symlinks resolved, lies under one of ``roots``."""
    if not is_inside(path, roots):
        allowed = ", ".join(roots) if roots else "none configured"
        raise OutsideStorageRoots(
            os.path.realpath(path), f"outside the storage roots ({allowed}); not changed"
        )


def root_problem(root: str) -> str | None:
    """Why ``root`` cannot be a storage root, or None: it must be absolute and must not be the
    whole file system ('/', '//', '/..', or a symlink to '/')."""
    if not os.path.isabs(root):
        return f"{root!r} is not an absolute path"
    if os.path.normpath(root).strip("/") == "" or os.path.realpath(root) == "/":
        return f"{root!r} is the whole file system: it would allow changing every image on the host"
    return None
