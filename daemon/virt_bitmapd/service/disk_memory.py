"""What the daemon remembers about each disk between looks, in memory only, and the rules for
retrying.  No I/O.

Everything is keyed by (domain UUID, disk target) and dropped with the domain, so the daemon's
memory follows the host's domains instead of growing with every domain it ever saw.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..fingerprints import Fingerprint, LayerStat

__all__ = ["COMMIT_ATTEMPTS", "DiskKey", "DiskMemory", "commit_retry_delay", "look_retry_delay"]

DiskKey = tuple[str, str]  # (domain UUID, disk target)

RETRY_FIRST = 5.0  # seconds before the first retry; each one after waits twice as long
#: Tries of a commit whose failure may pass (an image briefly held by another process) before
#: it is counted as failed: 5 + 10 + 20 + 40 + 80 s of waiting, about 2.5 minutes.
COMMIT_ATTEMPTS = 6


def look_retry_delay(previous: float | None, cap: float) -> float:
    """The delay before looking again at a disk whose look may succeed later, growing each time
    up to ``cap`` (a rescan would look at it then anyway)."""
    return RETRY_FIRST if previous is None else min(previous * 2, cap)


def commit_retry_delay(failures: int) -> float | None:
    """After ``failures`` retryable failures of one commit in a row: the delay before the next
    try, or None when tries have run out."""
    if failures >= COMMIT_ATTEMPTS:
        return None
    return float(RETRY_FIRST * 2 ** (failures - 1))


@dataclass(slots=True)
class DiskMemory:
    #: disks whose skip (raw, outside the storage roots, ...) was logged already
    skip_logged: set[DiskKey] = field(default_factory=set)
    look_delays: dict[DiskKey, float] = field(default_factory=dict)
    commit_failures: dict[DiskKey, int] = field(default_factory=dict)
    #: monotonic time of a look at a running disk that found commits no COMPLETED event has
    #: claimed yet (the look at an active commit's READY, which may see the pivot done)
    unclaimed_commits: dict[DiskKey, float] = field(default_factory=dict)
    #: the error of a disk's last look, as (kind, message)
    errors: dict[DiskKey, tuple[str, str]] = field(default_factory=dict)
    absent_logged: set[str] = field(default_factory=set)
    #: each checkpoint's state at the disk's last look (``reports.health_memory``)
    checkpoint_states: dict[DiskKey, dict[str, str]] = field(default_factory=dict)
    #: the chain, top first, and whether the domain ran, at the disk's last complete look: what
    #: the directory watch and the snapshot safety net compare with
    chains: dict[DiskKey, tuple[str, ...]] = field(default_factory=dict)
    running: dict[DiskKey, bool] = field(default_factory=dict)
    #: what the disk's last complete look saw before it read (None: it proved nothing)
    fingerprints: dict[DiskKey, Fingerprint | None] = field(default_factory=dict)
    #: each layer's stat as the disk's last look left it (``LookResult.left_stats``)
    left_stats: dict[DiskKey, Mapping[str, LayerStat]] = field(default_factory=dict)
    #: disks whose chain held a bitmap at the last look (the safety net watches only those)
    with_bitmaps: set[DiskKey] = field(default_factory=set)

    def record_error(self, key: DiskKey, kind: str, message: str) -> bool:
        """Remember a failed look; True when it differs from the disk's last error (log it)."""
        changed = self.errors.get(key) != (kind, message)
        self.errors[key] = (kind, message)
        return changed

    def clear_error(self, key: DiskKey) -> tuple[str, str] | None:
        """A look succeeded: the error it ends, if there was one."""
        return self.errors.pop(key, None)

    def errors_by_kind(self) -> dict[str, int]:
        return dict(Counter(kind for kind, _ in self.errors.values()))

    def _per_disk(self) -> tuple[dict[DiskKey, Any], ...]:
        return (
            self.look_delays,
            self.commit_failures,
            self.unclaimed_commits,
            self.errors,
            self.checkpoint_states,
            self.chains,
            self.running,
            self.fingerprints,
            self.left_stats,
        )

    def forget_disk(self, key: DiskKey) -> None:
        for mapping in self._per_disk():
            mapping.pop(key, None)
        self.skip_logged.discard(key)
        self.with_bitmaps.discard(key)

    def forget_domain(self, uuid: str) -> None:
        keys = set(self.skip_logged).union(self.with_bitmaps, *self._per_disk())
        for key in keys:
            if key[0] == uuid:
                self.forget_disk(key)
        self.absent_logged.discard(uuid)
