"""The look's pure rules: which commits there are, what may be done about them, and what the
look leaves behind.  No I/O; tested by tables.

``decide`` runs once, on what ``gather`` read, before anything is changed: the commits (layers
gone from the known chain, less those a completed block copy replaced; plus commits hidden
between two looks, found from the files beside the chain), which of them nothing proves were
commits rather than layers discarded (``why_unproven``), and whether this look may fill (or
disable) the untrusted, heal or unite the top.  The other rules are what ``act`` and ``run``
consult once acting has told how each commit ended: where committed layers' bits now live, what
the chain holds after a reconciliation proved its merges, whether the look is clean, which
bitmaps to remember.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence, Set
from dataclasses import dataclass, field, replace

from ..births import Births, births_now, chain_then
from ..checkpoint_xml import Checkpoint
from ..filling import Filled, fills_now
from ..lost_bits import committed_into
from ..model import Bitmap, Image, Result
from ..readers.chain import ChainNow
from ..tracking import Commit, copied_away, detect_commits, hidden_commits
from .findings import CommitReport
from .gather import Gathered
from .proof import why_unproven

__all__ = [
    "CARRIED",
    "SAFEGUARDS",
    "Decision",
    "Safeguard",
    "bitmaps_to_remember",
    "chain_after",
    "decide",
    "is_clean",
    "merged_into_after",
    "united_after",
    "with_bitmaps",
]


class Safeguard(enum.Enum):
    """What is done with a bitmap whose bits cannot be proven complete."""

    #: every bit set in the top's copy (``filling``); disabled where that fails
    FILL = "fill"
    #: disabled in the top (``quarantine``): libvirt refuses it, ``qemu-nbd`` still exports it
    DISABLE = "disable"


#: The ``untrusted`` policy's values -> the safeguard ("report": none).
SAFEGUARDS = {"fill": Safeguard.FILL, "disable": Safeguard.DISABLE}

#: Commit results that prove the committed layers' bits reached the base.
CARRIED = (Result.RECONCILED, Result.ALREADY_CONSISTENT, Result.NOTHING_TO_DO)


@dataclass(frozen=True, slots=True, kw_only=True)
class Decision:
    commits: tuple[Commit, ...] = ()
    #: Commits nothing proves (the layers may have been discarded) -> why.
    unproven: Mapping[Commit, str] = field(default_factory=dict)
    #: Birth layers a completed block copy replaced -> the new top holding their bitmaps.
    copied_into: Mapping[str, str] = field(default_factory=dict)
    #: What makes untrusted bitmaps safe, as the policy says, when no block job is handling
    #: bitmaps (libvirt may be, half-way); None: they are only reported.
    safeguard: Safeguard | None = None
    #: Policy allows it, the domain is shut off and its checkpoints could be read.
    may_heal: bool = False
    #: Where each checkpoint was taken, as far as anything proves it (``births``).
    births: Births = field(default_factory=dict)
    #: The fills of earlier looks that still stand (``filling``).
    filled: Mapping[str, Filled] = field(default_factory=dict)
    #: The chain has layers below the top, and is not the one the top's union was last
    #: established for (a snapshot, a commit, a chain first seen or changed while a job ran),
    #: or its top holds a bitmap it did not: the copies below are merged into the top's, for
    #: readers that export one copy (``top_union``).
    may_unite: bool = False


def decide(
    gathered: Gathered,
    *,
    copied: bool,
    safeguard: Safeguard | None,
    heal: bool,
    job_done: bool = False,
) -> Decision:
    """``copied``: a block copy of this disk just completed (its pivot replaced the top by a
    copy that holds the top's bitmaps), so the layers it replaced were not committed;
    ``job_done``: libvirt said a commit or pull of this disk completed (its event)."""
    now = gathered.now
    assert now is not None, "decide needs a chain"
    old = gathered.old_chain
    replaced = set(copied_away(old, now.paths)) if copied else set()
    commits = tuple(c for c in detect_commits(old, now.paths) if not set(c.removed) <= replaced)
    unproven = {
        commit: why
        for commit in commits
        if (why := why_unproven(commit, gathered, job_done=job_done)) is not None
    }
    if gathered.beside and gathered.host is not None:
        in_no_chain = {
            path: below
            for path, below in gathered.beside.items()
            if path not in gathered.host.chain_files
        }
        commits += hidden_commits(now.paths, in_no_chain)
    births = births_now(
        gathered.checkpoints, gathered.target, gathered.record.births.get(gathered.target, {})
    )
    filled = fills_now(
        gathered.record.filled.get(gathered.target, {}),
        now.images,
        gathered.checkpoints,
        gathered.target,
    )
    return Decision(
        commits=commits,
        unproven=unproven,
        copied_into=_copied_into(
            now.paths,
            replaced,
            gathered.checkpoints,
            gathered.target,
            births=births,
            filled=filled,
        ),
        safeguard=None if now.job_running else safeguard,
        may_heal=heal and not gathered.running and gathered.checkpoint_error is None,
        births=births,
        filled=filled,
        may_unite=not now.job_running and len(now.paths) > 1 and _top_may_lack_union(gathered),
    )


def _top_may_lack_union(gathered: Gathered) -> bool:
    """Whether the top's copies may not hold the copies below them: the union was last
    established for another chain (or never), or the top holds a bitmap it did not at the last
    look (made by ``virt-bitmapd heal``, say)."""
    now = gathered.now
    assert now is not None
    if now.paths != gathered.record.united.get(gathered.target):
        return True
    before = {b.name for b in gathered.last_bitmaps.get(now.paths[0], ())}
    return any(b.name not in before for b in now.images[0].bitmaps)


def united_after(
    acted_on: tuple[str, ...], now: ChainNow, *, union_failed: bool
) -> tuple[str, ...] | None:
    """The chain the look leaves with its top holding the copies below it: the one it acted on,
    when a union it needed did not fail, no block job ran and the chain did not move since."""
    if union_failed or now.job_running or now.paths != acted_on:
        return None
    return now.paths


def merged_into_after(
    known: Mapping[str, str],
    reports: Sequence[CommitReport],
    chain: tuple[str, ...],
    copied_into: Mapping[str, str],
) -> dict[str, str]:
    """Layer -> the layer it was committed into with its bits (commits handled well, and what
    a block copy replaced); kept while it leads to a layer of the chain."""
    merged = dict(known)
    for report in reports:
        if report.error is None and report.result in CARRIED:
            merged.update(dict.fromkeys(report.commit.removed, report.commit.base))
    merged.update(copied_into)
    in_chain = set(chain)
    return {
        layer: into
        for layer, into in merged.items()
        if into in in_chain or committed_into(into, merged) & in_chain
    }


def chain_after(now: ChainNow, reports: Sequence[CommitReport]) -> ChainNow:
    """The chain once these reconciliations are done: each base holds every bitmap its plan
    merged, recording and consistent (the reconciliation verified that before it ended well)."""
    added: dict[str, dict[str, Bitmap]] = {}
    for report in reports:
        if report.error is None and report.outcome is not None and report.outcome.changed:
            plan = report.outcome.plan
            for merge in plan.merges:
                added.setdefault(plan.base, {})[merge.bitmap] = Bitmap(
                    name=merge.bitmap, granularity=merge.granularity, recording=True
                )
    return with_bitmaps(now, added)


def with_bitmaps(now: ChainNow, added: Mapping[str, Mapping[str, Bitmap]]) -> ChainNow:
    """The chain with ``added`` (layer -> bitmap name -> the copy an action made there): a
    copy that was unusable there is replaced, a usable one kept."""
    if not added:
        return now
    return replace(now, images=tuple(_with_bitmaps(image, added) for image in now.images))


def _with_bitmaps(image: Image, added: Mapping[str, Mapping[str, Bitmap]]) -> Image:
    new = added.get(image.path)
    if not new:
        return image
    kept = tuple(b for b in image.bitmaps if b.name not in new or b.usable)
    names = {b.name for b in kept}
    return replace(image, bitmaps=kept + tuple(b for n, b in new.items() if n not in names))


def is_clean(
    reports: Sequence[CommitReport], errors: Sequence[object | None], job_running: bool
) -> bool:
    """Whether the look proved its disk's state: no commit, checkpoint read, fill,
    quarantine, heal or union failed, and no block job ran meanwhile.  Else the next rescan
    must read again: what failed may work then."""
    return not (
        any(r.error is not None for r in reports)
        or any(error is not None for error in errors)
        or job_running
    )


def keeps_old_chain(reports: Sequence[CommitReport]) -> bool:
    """A commit whose failure may pass is tried again on the chain it was found from: the old
    chain stays in the state directory until then."""
    return any(r.error is not None and r.error.retryable for r in reports)


def bitmaps_to_remember(
    now: ChainNow, last_bitmaps: Mapping[str, tuple[Bitmap, ...]]
) -> dict[str, tuple[Bitmap, ...]]:
    """Each layer's bitmaps as seen now; but the ones seen before where a block job ran while
    the chain was read (libvirt may be half-way through its own bitmap handling)."""
    return {
        image.path: last_bitmaps[image.path]
        if now.job_running and image.path in last_bitmaps
        else image.bitmaps
        for image in now.images
    }


def _copied_into(
    chain: tuple[str, ...],
    replaced: Set[str],
    checkpoints: Sequence[Checkpoint],
    target: str,
    *,
    births: Births,
    filled: Mapping[str, Filled],
) -> dict[str, str]:
    """After a block copy's pivot: each checkpoint's birth layer that the copy replaced -> the
    new top, which libvirt gave the replaced layers' bitmaps.  A birth layer gone some other way
    (before the copy, unseen) is not the copy's to vouch for."""
    copied = {}
    for checkpoint in checkpoints:
        disk = checkpoint.disk(target)
        then = None if disk is None else chain_then(checkpoint, disk, births, filled)
        if then and then[0] in replaced:
            copied[then[0]] = chain[0]
    return copied
