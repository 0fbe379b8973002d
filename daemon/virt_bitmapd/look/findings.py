"""What a look at a disk found, and what it means.  Pure: values and functions over values.

A look yields a LookResult, holding a CommitReport per commit it found.  The functions below
decide, from those values alone, how each commit ended (its metric label), which bitmaps it
leaves untrusted, and which bitmaps a commit that failed may have left short.  Tested by tables,
like the planner.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from ..births import Births
from ..errors import (
    BitsUnrecoverable,
    CommitUnproven,
    CommitUnverifiable,
    OutsideStorageRoots,
    VirtBitmapdError,
)
from ..filling import Filled
from ..fingerprints import Fingerprint, LayerStat
from ..healing import HealStep
from ..health import CheckpointHealth, Distrust
from ..marks import Marks
from ..model import Bitmap, Image, Outcome, Plan, Result, SkipReason
from ..planner import chain_problems
from ..tracking import Commit

__all__ = [
    "NO_SUCH_DISK",
    "CommitReport",
    "LookResult",
    "bitmap_states",
    "bitmaps_at_risk",
    "bitmaps_held",
    "result_label",
    "untrusted_after",
]

NO_SUCH_DISK = "no such file-backed disk"


@dataclass(frozen=True, slots=True, kw_only=True)
class CommitReport:
    commit: Commit
    live: bool
    duration: float
    result: Result | None = None
    plan: Plan | None = None
    outcome: Outcome | None = None
    error: VirtBitmapdError | None = None
    #: On a failure no later look will retry: the bitmaps that may now miss the commit's bits.
    at_risk: tuple[str, ...] = ()
    #: Why it ended so, when the result alone does not say.
    note: str = ""

    @property
    def label(self) -> str:
        return result_label(self.result, self.error)


@dataclass(frozen=True, slots=True, kw_only=True)
class LookResult:
    domain: str
    uuid: str
    disk: str
    running: bool = False
    chain: tuple[str, ...] = ()
    commits: tuple[CommitReport, ...] = ()
    #: Why the disk was not looked at, if it was not (outside the storage roots, ...).
    skipped: str | None = None
    #: The look itself failed (chain unreadable, libvirtd gone, ...).
    error: VirtBitmapdError | None = None
    first_sight: bool = False
    previous_chain: tuple[str, ...] = ()
    bitmap_states: dict[str, int] = field(default_factory=dict)
    untrusted: tuple[str, ...] = ()
    #: The state store's generation of the domain when the look began (see StateStore).
    generation: int = 0
    #: Each checkpoint of the disk (and each bitmap no checkpoint names), judged.
    health: tuple[CheckpointHealth, ...] = ()
    #: libvirt could not list the checkpoints (then ``health`` is empty).
    checkpoint_error: VirtBitmapdError | None = None
    #: Bitmaps this look gave every bit, each with why it was untrusted; and a failure to.
    filled: Mapping[str, str] = field(default_factory=dict)
    fill_error: VirtBitmapdError | None = None
    #: Bitmaps this look disabled, each with why it is untrusted.
    quarantined: Mapping[str, str] = field(default_factory=dict)
    quarantine_error: VirtBitmapdError | None = None
    #: Bitmaps this look rebuilt from overlays' allocation (policy heal), and a failure to.
    healed: tuple[HealStep, ...] = ()
    heal_error: VirtBitmapdError | None = None
    #: Bitmaps whose top copy this look made hold the copies below it, and a failure to.
    united: tuple[str, ...] = ()
    union_error: VirtBitmapdError | None = None
    #: What this look saw before it read, if it may spare a rescan the reading.
    fingerprint: Fingerprint | None = None
    #: Each layer's stat as the look left it, its own writes included: a change the watch
    #: reports that leaves every one so is the look's own.
    left_stats: Mapping[str, LayerStat] = field(default_factory=dict)
    #: What the next look proves commits against (``decide.marks_after``).
    marks: Marks = field(default_factory=Marks)
    #: What the state directory is to keep for the disk (see ``StateStore.put_disk``).
    distrust: Mapping[str, Distrust] = field(default_factory=dict)
    layer_bitmaps: Mapping[str, tuple[Bitmap, ...]] = field(default_factory=dict)
    merged_into: Mapping[str, str] = field(default_factory=dict)
    births: Births = field(default_factory=dict)
    fills: Mapping[str, Filled] = field(default_factory=dict)
    #: The chain the look left with its top holding the union of the copies below it (None
    #: when it did not: a union failed, a job ran, the chain moved meanwhile).
    united_chain: tuple[str, ...] | None = None
    #: When (time.time()) the look began: files changed after it are news to the next one.
    started_at: float = 0.0
    #: The stages the look ran, in order (``look.run``): what a reader of the logs can follow.
    stages: tuple[str, ...] = ()


def result_label(result: Result | None, error: VirtBitmapdError | None) -> str:
    """The metric label of how a reconciliation ended."""
    if isinstance(error, CommitUnproven):
        return "unproven"
    if isinstance(error, BitsUnrecoverable):
        return "unrecoverable"
    if isinstance(error, OutsideStorageRoots | CommitUnverifiable):
        return "skipped"
    if error is not None or result is None:
        return "failed"
    return result.value.replace(" ", "_")


_STATE_OF_REASON = {
    SkipReason.DISABLED: "disabled",
    SkipReason.INCONSISTENT: "inconsistent",
    SkipReason.GAP: "broken_chain",
    SkipReason.NOT_IN_TOP: "broken_chain",
    SkipReason.NOT_PERSISTENT: "broken_chain",
}


def bitmap_states(chain: Sequence[Image]) -> tuple[dict[str, int], set[str]]:
    """Per state (the ``virt_bitmapd_bitmaps`` labels), how many of the chain's bitmaps are in
    it; and the names of those that are not valid."""
    states = {"valid": 0, "disabled": 0, "inconsistent": 0, "broken_chain": 0}
    invalid: set[str] = set()
    for name, problem in chain_problems(tuple(chain)).items():
        if problem is None:
            states["valid"] += 1
        else:
            states[_STATE_OF_REASON[problem[0]]] += 1
            invalid.add(name)
    return states, invalid


# A bitmap skipped for these reasons may still look valid once the committed layers are gone
# (the gap, or the layer that did not record, leaves the chain), yet it misses their bits.  One
# missing from the commit top but present below it ends in the base without the top's bits.
_BROKEN_BY_COMMIT = (
    SkipReason.NOT_IN_TOP,
    SkipReason.GAP,
    SkipReason.DISABLED,
    SkipReason.INCONSISTENT,
    SkipReason.NOT_PERSISTENT,
)


def untrusted_after(reports: Sequence[CommitReport]) -> dict[str, str]:
    """Bitmaps these commits leave untrustworthy, each with why (for ``status``)."""
    why: dict[str, str] = {}
    for report in reports:
        commit = f"the commit of {', '.join(report.commit.removed)} into {report.commit.base}"
        if isinstance(report.error, CommitUnproven):
            for name in report.error.bitmaps:
                why.setdefault(
                    name,
                    f"nothing proves {', '.join(report.commit.removed)} were committed into "
                    f"{report.commit.base} ({report.error.why}); discarded, they changed every "
                    "cluster they held",
                )
        elif isinstance(report.error, BitsUnrecoverable):
            for name in report.error.bitmaps:
                why.setdefault(name, f"{commit} could not carry its bits ({report.error.kind})")
        for name in report.at_risk:
            why.setdefault(name, f"{commit} failed ({report.label}): its bits may be missing")
        if report.plan is not None:
            for skip in report.plan.skipped:
                if skip.reason in _BROKEN_BY_COMMIT:
                    why.setdefault(
                        skip.bitmap,
                        f"{commit} could not carry it: {skip.reason.value} in {skip.image}",
                    )
    return why


def bitmaps_at_risk(
    commit: Commit,
    last_bitmaps: Mapping[str, tuple[Bitmap, ...]],
    chain_now: Sequence[Image],
) -> tuple[str, ...]:
    """Bitmaps that may miss the commit's bits when it could not be carried out: those the
    committed layers held when last seen (they may look valid now), and the base's own; all of
    the chain's if the layers were never seen."""
    names = set(bitmaps_held(commit.removed, last_bitmaps))
    if not names:
        names = {b.name for image in chain_now for b in image.bitmaps}
    base = next((image for image in chain_now if image.path == commit.base), None)
    if base is not None:
        names.update(b.name for b in base.bitmaps)
    return tuple(sorted(names))


def bitmaps_held(
    layers: Sequence[str], last_bitmaps: Mapping[str, tuple[Bitmap, ...]]
) -> tuple[str, ...]:
    """The names of the bitmaps ``layers`` held when last seen, sorted."""
    return tuple(sorted({b.name for path in layers for b in last_bitmaps.get(path, ())}))
