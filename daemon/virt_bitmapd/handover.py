"""What `virt-bitmapd reconcile` leaves for the daemon: commits it reconciled.

A cold-merge tool runs `qemu-img commit`, then `virt-bitmapd reconcile`, then deletes the
committed files once that exits 0.  When the daemon next looks, those layers are gone; without a
word from the command line it could only say their bits are unprovable.  So the command, when it
ends well, writes one small record under the daemon's state directory (root's alone): the base,
each layer it covered with that file's identity (device and inode), and when.

A record speaks for those files only, once.  The daemon takes it when it finds exactly those
layers gone and the files its last look saw at those paths were the same ones (a later layer
made at a reused path is another file); a record that does not fit them is dropped, and so is
one whose commit the daemon reconciled itself while the layers were still there.  Records older
than the retention are dropped unread.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

from .retention import RETENTION

__all__ = ["Handover", "Identity", "identity_of"]

#: (device, inode) of a file: which file a path named, not what it held
Identity = tuple[int, int]


def identity_of(path: str) -> Identity | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


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
        document = {
            "base": base,
            "layers": [[path, identity_of(path)] for path in layers],
            "at": time.time(),
        }
        handle, temporary = tempfile.mkstemp(dir=self.directory, prefix=".tmp-")
        with os.fdopen(handle, "w") as stream:
            json.dump(document, stream)
        os.replace(temporary, self._path(base))
        return True

    def take(
        self, base: str, gone: tuple[str, ...], last_seen: Mapping[str, Identity]
    ) -> float | None:
        """When ``gone`` (layers committed into ``base``) were reconciled by the command line,
        or None.  ``last_seen``: the identity of the file at each path at the daemon's last
        look; a layer not there is no proof.  A record that answers, or that names other files
        at those paths, is removed."""
        path = self._path(base)
        try:
            document = json.loads(path.read_text())
            at = float(document["at"])
            layers = {str(p): _identity(i) for p, i in document["layers"]}
            covered = document["base"] == base and set(gone) <= set(layers)
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if time.time() - at > RETENTION:
            path.unlink(missing_ok=True)
            return None
        if not covered:
            return None
        path.unlink(missing_ok=True)
        if any(layers[p] is None or layers[p] != last_seen.get(p) for p in gone):
            return None  # those files are not the ones the command reconciled
        return at

    def drop(self, base: str, layers: tuple[str, ...]) -> None:
        """The daemon reconciled this commit itself: a record of it has served."""
        path = self._path(base)
        try:
            document = json.loads(path.read_text())
            covered = set(layers) <= {str(p) for p, _ in document["layers"]}
        except (OSError, ValueError, KeyError, TypeError):
            return
        if covered:
            path.unlink(missing_ok=True)


def _identity(raw: object) -> Identity | None:
    if isinstance(raw, list) and len(raw) == 2 and all(isinstance(n, int) for n in raw):
        return raw[0], raw[1]
    return None
