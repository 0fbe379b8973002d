"""Layers a commit took along that the daemon never saw, found by their files.  Blocking I/O.

A commit that took the top of a known chain away may have taken layers made on that top since
the last look (a snapshot just before an active commit, snapshots while the daemon was stopped):
a plan from the known top alone would give the base bitmaps that miss their bits.  Their files
still name what they were made on, so recent files beside the chain's own are read
(``images.recent_overlays``) and followed upwards from the top (``tracking.layers_above``).

Only files under the storage roots count, only those whose header records a qcow2 backing, and
never a file some domain uses as a raw disk: its header is its guest's.  One run of overlays
joins the commit.  A fork (several made on one layer), or an overlay that does not continue the
top's recording bitmaps, cannot be resolved: at rest that is unrecoverable; live, libvirt merged
from every layer itself, so the commit is verified on the layers known.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping, Sequence

import libvirt

from .. import images
from ..domain_xml import parse_domain
from ..errors import CommittedLayersGone, LibvirtFailed, UnseenLayersForked, VirtBitmapdError
from ..model import Bitmap, Image
from ..tracking import Commit, layers_above
from .reports import bitmaps_at_risk

__all__ = ["raw_files_of_every_domain", "require_layers", "with_unseen_layers"]


def raw_files_of_every_domain(domain: libvirt.virDomain) -> set[str]:
    """Files any domain of the host uses as a disk in a format other than qcow2: their first
    bytes are a guest's, so a qcow2 header found there is believed by nobody."""
    try:
        documents = []
        for other in domain.connect().listAllDomains(0):
            documents.append(other.XMLDesc(0))
            if other.isActive() and other.isPersistent():  # the next boot's disks too
                documents.append(other.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
    except libvirt.libvirtError as error:
        raise LibvirtFailed(f"cannot list the host's disks: {error}") from error
    raw: set[str] = set()
    for document in documents:
        raw.update(os.path.realpath(path) for path in parse_domain(document).raw_files)
    return raw


def with_unseen_layers(
    commit: Commit,
    *,
    known: set[str],
    since: float,
    seen_before: Mapping[str, tuple[Bitmap, ...]],
    live: bool,
    storage_roots: Sequence[str],
    raw_files: set[str],
) -> Commit:
    """``commit``, with the run of layers made on its top since ``since`` joined to it."""
    directories = {os.path.dirname(path) for path in known}
    backing_of = images.recent_overlays(
        directories,
        newer_than=since,
        exclude=known,
        storage_roots=storage_roots,
        not_overlays=raw_files,
    )
    above = layers_above(commit.top, backing_of)
    if above.forks and live:
        return commit
    if above.forks:
        at_risk = {b.name for path in commit.removed for b in seen_before.get(path, ())}
        for path in above.forks:
            with contextlib.suppress(VirtBitmapdError):
                at_risk.update(b.name for b in images.read_image(path, force_share=True).bitmaps)
        raise UnseenLayersForked(commit.base, commit.top, above.forks, tuple(sorted(at_risk)))
    if not above.run:
        return commit
    if not live:
        _require_bitmaps_continued(commit, above.run[0], seen_before)
    return Commit(removed=above.run + commit.removed, base=commit.base)


def _require_bitmaps_continued(
    commit: Commit, new_top: str, seen_before: Mapping[str, tuple[Bitmap, ...]]
) -> None:
    """An overlay made on the committed top continues its recording bitmaps (libvirt's
    snapshots do); one that lacks some was not made so, or is not what its header claims.
    Either way which bits the base needs cannot be told: refuse rather than plan from it."""
    had = {b.name for b in seen_before.get(commit.top, ()) if b.recording}
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
    seen_before: Mapping[str, tuple[Bitmap, ...]],
    chain_now: Sequence[Image],
) -> None:
    """Refuse a commit whose layers are already deleted: their bits cannot be proven to be in
    the base."""
    missing = tuple(path for path in commit.removed if not os.path.exists(path))
    if missing:
        raise CommittedLayersGone(
            commit.base, missing, bitmaps_at_risk(commit, seen_before, chain_now)
        )
