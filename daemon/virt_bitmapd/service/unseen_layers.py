"""Layers a commit took along that the daemon never saw, found by their files.  Blocking I/O.

A commit that took the top of a known chain away may have taken layers made on that top since
the last look (a snapshot just before an active commit, snapshots while the daemon was stopped):
a plan from the known top alone would give the base bitmaps that miss their bits.  Their files
still name what they were made on, so recent files beside the chain's own are read
(``images.recent_overlays``) and followed upwards from the top (``tracking.layers_above``).

Only files under the storage roots count, only those whose header records a qcow2 backing, and
never a file some domain uses as a raw disk: its header is its guest's.

Maintenance between two looks can also hide a commit entirely (a layer committed, the one above
rebased onto the base: the chain seems to have grown); ``hidden_commits_of`` finds those from the
committed files left beside the chain.  One run of overlays
joins the commit.  A fork (several made on one layer), or an overlay that does not continue the
top's recording bitmaps, cannot be resolved: at rest that is unrecoverable; live, libvirt merged
from every layer itself, so the commit is verified on the layers known.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import libvirt

from .. import images
from ..domain_xml import parse_domain
from ..errors import CommittedLayersGone, LibvirtFailed, UnseenLayersForked, VirtBitmapdError
from ..model import QCOW2, Bitmap, Image
from ..tracking import Commit, hidden_commits, layers_above
from .reports import bitmaps_at_risk

__all__ = [
    "HostDisks",
    "hidden_commits_of",
    "host_disks",
    "overlays_beside",
    "require_layers",
    "with_unseen_layers",
]

MAX_DEPTH = 64


@dataclass(frozen=True, slots=True)
class HostDisks:
    #: Files any domain uses as a disk in a format other than qcow2: their first bytes are a
    #: guest's, so a qcow2 header found there is believed by nobody.
    raw_files: frozenset[str]
    #: Every layer of every domain's qcow2 chains (libvirt's XML, then the headers below).
    chain_files: frozenset[str]


def host_disks(domain: libvirt.virDomain) -> HostDisks:
    """What every domain of the host uses, live and at its next boot."""
    try:
        documents = []
        for other in domain.connect().listAllDomains(0):
            documents.append(other.XMLDesc(0))
            if other.isActive() and other.isPersistent():  # the next boot's disks too
                documents.append(other.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
    except libvirt.libvirtError as error:
        raise LibvirtFailed(f"cannot list the host's disks: {error}") from error
    raw: set[str] = set()
    chains: set[str] = set()
    for document in documents:
        disks = parse_domain(document)
        raw.update(os.path.realpath(path) for path in disks.raw_files)
        for disk in disks.disks:
            chains.update(os.path.realpath(path) for path in disk.paths)
            chains.update(_layers_below(os.path.realpath(disk.paths[-1])))
    return HostDisks(raw_files=frozenset(raw), chain_files=frozenset(chains))


def _layers_below(path: str) -> list[str]:
    """The backing files named by qcow2 headers from ``path`` down (headers only, no QEMU)."""
    below: list[str] = []
    while len(below) < MAX_DEPTH:
        try:
            header = images.read_header(path)
        except VirtBitmapdError:
            break
        if header.backing_name is None:
            break
        path = images.backing_path(path, header.backing_name)
        below.append(path)
        if header.backing_format != QCOW2:
            break
    return below


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


def hidden_commits_of(
    chain: Sequence[str], beside: Mapping[str, str], host: HostDisks
) -> tuple[Commit, ...]:
    """Layers committed into ``chain`` between two looks that the chain does not show
    (``tracking.hidden_commits``), from the overlays ``beside`` it that are in no domain's
    chain."""
    return hidden_commits(
        chain, {path: below for path, below in beside.items() if path not in host.chain_files}
    )


def with_unseen_layers(
    commit: Commit,
    *,
    beside: Mapping[str, str],
    seen_before: Mapping[str, tuple[Bitmap, ...]],
    live: bool,
) -> Commit:
    """``commit``, with the run of the overlays ``beside`` the chain made on its top joined."""
    above = layers_above(commit.top, beside)
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
