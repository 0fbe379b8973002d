"""What `virt-bitmapd reconcile` leaves for the daemon: commits it reconciled.

A cold-merge tool runs `qemu-img commit`, then `virt-bitmapd reconcile`, then deletes the
committed files once that exits 0.  When the daemon next looks, those layers are gone; without a
word from the command line it could only say their bits are unprovable.  So the command, when it
ends well, writes one small record under the daemon's state directory (root's alone): the base,
the layers it covered, and when.  The daemon takes the record when it finds exactly those layers
gone, and reports the commit as reconciled before its layers were deleted.  Records older than
the retention are dropped unread.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path

from .retention import RETENTION

__all__ = ["Handover"]


class Handover:
    def __init__(self, state_dir: str | Path) -> None:
        self.directory = Path(state_dir) / "reconciled"

    def _path(self, base: str) -> Path:
        return self.directory / f"{hashlib.sha256(base.encode()).hexdigest()[:32]}.json"

    def record(self, base: str, layers: tuple[str, ...]) -> bool:
        """Note that ``layers`` (top first) were reconciled into ``base``.  Only where the
        daemon's state directory exists; False when there is none (no daemon to tell)."""
        if not self.directory.parent.is_dir():
            return False
        self.directory.mkdir(mode=0o700, exist_ok=True)
        document = {"base": base, "layers": list(layers), "at": time.time()}
        handle, temporary = tempfile.mkstemp(dir=self.directory, prefix=".tmp-")
        with os.fdopen(handle, "w") as stream:
            json.dump(document, stream)
        os.replace(temporary, self._path(base))
        return True

    def take(self, base: str, gone: tuple[str, ...]) -> float | None:
        """When ``gone`` (layers committed into ``base``) were reconciled by the command line,
        or None; a record that answers is removed."""
        path = self._path(base)
        try:
            document = json.loads(path.read_text())
            at = float(document["at"])
            covered = document["base"] == base and set(gone) <= set(document["layers"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if time.time() - at > RETENTION:
            path.unlink(missing_ok=True)
            return None
        if not covered:
            return None
        path.unlink(missing_ok=True)
        return at
