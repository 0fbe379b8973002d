"""What proves that layers gone from a chain were committed, not discarded.  Pure: no I/O.

A layer leaving the chain reads the same whether its content went into the base (a commit),
into the layer above (a pull) or nowhere (a revert to the base, a snapshot thrown away).  A
discarded layer takes the content of every cluster it held with it, written before any
checkpoint or after, and no bitmap says which.  So it is a commit only when something proves it:

- libvirt's event for the job (a commit or a pull of the disk completed);
- the domain running, and not started since the last look: a running QEMU's chain changes only
  through libvirt's block jobs, which carry the layers' data and bitmaps;
- the base (or the layer above the ones gone) written since the chain was last seen changed,
  while nothing the domain wrote can have gone into the base unrecorded: it did not start since
  the last look, or the base stayed below layers that look knew (the domain wrote into those);
- a record of ``virt-bitmapd reconcile`` for those very files (``act`` takes it).

``marks_after`` says what the next look compares with.
"""

from __future__ import annotations

from collections.abc import Mapping

from ..fingerprints import LayerStat, stat_fields
from ..marks import Marks
from ..tracking import Commit
from .gather import Gathered

__all__ = ["marks_after", "why_unproven"]

#: Whether the domain started since the last look (``Gathered.started_since``) -> why that
#: leaves a commit unproven when the domain may have written into the base.
_MAY_HAVE_RUN = {
    None: "whether the domain started since the last look cannot be told from its QEMU log",
    True: "the domain started since the last look: what it wrote may be in no bitmap",
}


def why_unproven(commit: Commit, gathered: Gathered, *, job_done: bool) -> str | None:
    """Why nothing proves ``commit`` (see above); None when something does.  ``job_done``:
    libvirt's event said a commit or pull of the disk completed."""
    if job_done or (gathered.running and gathered.started_since is False):
        return None
    not_written = _not_written(commit, gathered)
    if not_written is not None:
        return not_written
    if _base_exposed(commit.base, gathered):
        return _MAY_HAVE_RUN.get(gathered.started_since)
    return None


def _not_written(commit: Commit, gathered: Gathered) -> str | None:
    """Why nothing shows the base, or the layer above the ones gone, was written since the
    chain was last seen changed; None when one was."""
    old = gathered.old_chain
    at = old.index(commit.removed[0]) if commit.removed[0] in old else 0
    above = old[at - 1] if at > 0 else None
    now = gathered.now
    candidates = [commit.base]
    if above is not None and now is not None and above in now.paths:
        candidates.append(above)
    whys = [_why_not_written(path, gathered) for path in candidates]
    if any(why is None for why in whys):
        return None
    return "; ".join(why for why in whys if why)


def _why_not_written(path: str, gathered: Gathered) -> str | None:
    last = gathered.last_marks
    before = None if last is None else last.layers.get(path)
    # stat'ed after the chain was read: a write that came with the change the read saw shows
    now = gathered.stats_after_read.get(path)
    if before is None or now is None:
        return f"no earlier look left a stat of {path} to compare with"
    device, inode, size, mtime_ns, _ = stat_fields(before)
    if (device, inode) != stat_fields(now)[:2]:
        return f"{path} is another file than the last look saw"
    if (size, mtime_ns) == stat_fields(now)[2:4]:  # a change of owner or label is no write
        return f"{path} was not written since the last look"
    return None


def _base_exposed(base: str, gathered: Gathered) -> bool:
    """Whether a run of the domain may have written into ``base``: it is the top now, or a
    layer above it now is one the last look did not know (it may have been the top then)."""
    now = gathered.now
    if now is None or base not in now.paths:
        return True
    above = now.paths[: now.paths.index(base)]
    return not above or not set(above) <= set(gathered.old_chain)


def marks_after(
    gathered: Gathered,
    chain: tuple[str, ...],
    left: Mapping[str, LayerStat],
    *,
    touched: bool,
) -> Marks:
    """What the next look proves commits against: where the domain's QEMU log ended as this
    look began, and each layer's stat since the chain last changed or the daemon last wrote an
    image.  A tool may commit a layer and change the chain only later (``qemu-img commit``,
    then a rebase or a new domain XML): a look in between must not make the base's write look
    older than the chain it was made for."""
    last = gathered.last_marks
    layers = dict(left)
    if last is not None and not touched and chain == gathered.old_chain:
        layers.update((path, stat) for path, stat in last.layers.items() if path in layers)
    return Marks(layers, gathered.log_mark)
