"""Layers a commit took along that the daemon never saw, found by their files.  Blocking I/O.

A commit that took the top of a known chain away may have taken layers made on that top since
the last look (a snapshot just before an active commit, snapshots while the daemon was stopped):
a plan from the known top alone would give the base bitmaps that miss their bits.  Their files
still name what they were made on, so recent files beside the chain's own are read
(``images.recent_overlays``) and followed upwards from the top (``tracking.layers_above``).

Only files under the storage roots count, only those whose header records a qcow2 backing, and
never a file some domain uses as a raw disk: its header is its guest's.

Maintenance between two looks can also hide a commit entirely (a layer committed, the one above
rebased onto the base: the chain seems to have grown); ``decide`` finds those from the committed
files left beside the chain (``overlays_beside``).  One run of overlays joins the commit.  A
fork (several made on one layer), or an overlay that does not continue the top's recording
bitmaps, cannot be resolved: at rest that is unrecoverable; live, libvirt merged from every layer
itself, so the commit is verified on the layers known.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Mapping, Sequence

from .. import images
from ..errors import CommittedLayersGone, UnseenLayersForked, VirtBitmapdError
from ..model import Bitmap, Image
from ..readers.host_disks import HostDisks
from ..tracking import Commit, layers_above
from .findings import bitmaps_at_risk, bitmaps_held

__all__ = [
    "gone_layers",
    "overlays_beside",
    "require_layers",
    "with_unseen_layers",
]


def overlays_beside(
    chain: Sequence[str],
    old_chain: Sequence[str],
    *,
    since: float,
    storage_roots: Sequence[str],
    host: Callable[[], HostDisks],
) -> dict[str, str]:
    """qcow2 overlays in the folders of the old and new chains' layers, changed since
    ``since``, in neither chain and never a raw disk's file, each with what it backs onto.
    One scan serves both searches of a look."""
    known = set(chain) | set(old_chain)
    return images.recent_overlays(
        {os.path.dirname(path) for path in known},
        newer_than=since,
        exclude=known,
        storage_roots=storage_roots,
        not_overlays=lambda: host().raw_files,
    )


def with_unseen_layers(
    commit: Commit,
    *,
    beside: Mapping[str, str],
    last_bitmaps: Mapping[str, tuple[Bitmap, ...]],
    live: bool,
) -> Commit:
    """``commit``, with the run of the overlays ``beside`` the chain made on its top joined."""
    above = layers_above(commit.top, beside)
    if above.forks and live:
        return commit
    if above.forks:
        at_risk = set(bitmaps_held(commit.removed, last_bitmaps))
        for path in above.forks:
            with contextlib.suppress(VirtBitmapdError):
                at_risk.update(b.name for b in images.read_image(path, force_share=True).bitmaps)
        raise UnseenLayersForked(commit.base, commit.top, above.forks, tuple(sorted(at_risk)))
    if not above.run:
        return commit
    if not live:
        _require_bitmaps_continued(commit, above.run[0], last_bitmaps)
    return Commit(removed=above.run + commit.removed, base=commit.base)


def _require_bitmaps_continued(
    commit: Commit, new_top: str, last_bitmaps: Mapping[str, tuple[Bitmap, ...]]
) -> None:
    """An overlay made on the committed top continues its recording bitmaps (libvirt's
    snapshots do); one that lacks some was not made so, or is not what its header claims.
    Either way which bits the base needs cannot be told: refuse rather than plan from it."""
    had = {b.name for b in last_bitmaps.get(commit.top, ()) if b.recording}
    lacking = had - {b.name for b in images.read_image(new_top, force_share=True).bitmaps}
    if lacking:
        raise UnseenLayersForked(
            commit.base,
            commit.top,
            (new_top,),
            tuple(sorted(had)),
            why=f"it lacks {', '.join(repr(name) for name in sorted(lacking))}",
        )


def require_layers(
    commit: Commit,
    last_bitmaps: Mapping[str, tuple[Bitmap, ...]],
    chain_now: Sequence[Image],
) -> None:
    """Refuse a commit whose layers are already deleted: their bits cannot be proven to be in
    the base."""
    missing = gone_layers(commit)
    if missing:
        raise CommittedLayersGone(
            commit.base, missing, bitmaps_at_risk(commit, last_bitmaps, chain_now)
        )


def gone_layers(commit: Commit) -> tuple[str, ...]:
    """The committed layers whose files are deleted already."""
    return tuple(path for path in commit.removed if not os.path.exists(path))
