"""What a look at a disk found, and what it means.  Pure: values and functions over values.

A look (one check of one disk: its chain now against the one remembered) yields a DiskReport,
holding a CommitReport per commit it found.  The functions below decide, from those values
alone, how each commit ended (its metric label), which bitmaps it leaves untrusted, and which log
line tells of it; the daemon only carries them out.  They are tested by tables, like the planner.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import (
    BitsUnrecoverable,
    CommitUnverifiable,
    OutsideStorageRoots,
    VirtBitmapdError,
)
from ..fingerprints import Seen
from ..healing import HealStep
from ..health import CheckpointHealth, State
from ..model import Bitmap, Image, Outcome, Plan, Result, SkipReason
from ..planner import chain_problems
from ..tracking import Commit

__all__ = [
    "CommitReport",
    "DiskReport",
    "LogLine",
    "bitmap_states",
    "bitmaps_at_risk",
    "chain_line",
    "checkpoint_counts",
    "commit_line",
    "deferred_line",
    "health_lines",
    "health_memory",
    "result_label",
    "untrusted_after",
    "unverified_commit_line",
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
class DiskReport:
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
    #: Bitmaps this look disabled, each with why it is untrusted.
    quarantined: Mapping[str, str] = field(default_factory=dict)
    quarantine_error: VirtBitmapdError | None = None
    #: Bitmaps this look rebuilt from overlays' allocation (policy heal), and a failure to.
    healed: tuple[HealStep, ...] = ()
    heal_error: VirtBitmapdError | None = None
    #: What this look saw before it read, if it may spare a rescan the reading.
    seen: Seen | None = None


@dataclass(frozen=True, slots=True)
class LogLine:
    level: str
    event: str
    fields: Mapping[str, Any]


def result_label(result: Result | None, error: VirtBitmapdError | None) -> str:
    """The metric label of how a reconciliation ended."""
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
        if isinstance(report.error, BitsUnrecoverable):
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
    seen_before: Mapping[str, tuple[Bitmap, ...]],
    chain_now: Sequence[Image],
) -> tuple[str, ...]:
    """Bitmaps that may miss the commit's bits when it could not be carried out: those the
    committed layers held when last seen (they may look valid now), and the base's own; all of
    the chain's if the layers were never seen."""
    names = {b.name for path in commit.removed for b in seen_before.get(path, ())}
    if not names:
        names = {b.name for image in chain_now for b in image.bitmaps}
    base = next((image for image in chain_now if image.path == commit.base), None)
    if base is not None:
        names.update(b.name for b in base.bitmaps)
    return tuple(sorted(names))


def commit_line(report: CommitReport, trigger: str, job_type: str | None) -> LogLine:
    """The ``reconciliation`` line of one commit: info when it ended well, a warning when it
    was skipped, an error otherwise."""
    fields: dict[str, Any] = {
        "trigger": trigger,
        "job_type": job_type or ("live" if report.live else "offline"),
        "top": report.commit.top,
        "base": report.commit.base,
        "removed": list(report.commit.removed),
        "result": report.label,
        "found_by": "files" if report.commit.hidden else "chain",
        "duration": round(report.duration, 3),
    }
    if report.note:
        fields["reason"] = report.note
    if report.plan is not None:
        fields["bitmaps"] = [merge.bitmap for merge in report.plan.merges]
        fields["skipped"] = [f"{s.bitmap}: {s.reason.value}" for s in report.plan.skipped]
    if report.error is None:
        return LogLine("info", "reconciliation", fields)
    fields["error"] = str(report.error)
    fields["error_kind"] = report.error.kind
    if isinstance(report.error, BitsUnrecoverable):
        fields["untrusted"] = list(report.error.bitmaps)
        if report.plan is None:
            fields["bitmaps"] = list(report.error.bitmaps)
    elif report.at_risk:
        fields["untrusted"] = list(report.at_risk)
    return LogLine("warning" if report.label == "skipped" else "error", "reconciliation", fields)


def deferred_line(report: CommitReport, trigger: str, *, attempt: int, retry_in: float) -> LogLine:
    """A commit whose failure may pass, to be tried again."""
    return LogLine(
        "warning",
        "reconciliation_deferred",
        {
            "trigger": trigger,
            "top": report.commit.top,
            "base": report.commit.base,
            "error": str(report.error),
            "error_kind": report.error.kind if report.error else None,
            "attempt": attempt,
            "retry_in": retry_in,
        },
    )


def unverified_commit_line(
    report: DiskReport, trigger: str, job_type: str | None, *, completed: bool, just_handled: bool
) -> LogLine | None:
    """A COMPLETED commit event whose look found no known layer gone: the layers were made and
    committed away between two looks.  libvirt merged their bitmaps itself, but nothing here
    saw them, so nothing could be verified; said as a skipped reconciliation.  Not when the look
    begun at READY has handled the commit already (``just_handled``), nor at first sight."""
    if (
        not completed
        or job_type not in ("commit", "active_commit")
        or report.commits
        or report.first_sight
        or just_handled
    ):
        return None
    return LogLine(
        "warning",
        "reconciliation",
        {
            "trigger": trigger,
            "job_type": job_type,
            "result": "skipped",
            "reason": "no layer known to virt-bitmapd left the chain; the committed layers "
            "were made after its last look, so the commit was not verified",
            "chain": list(report.chain),
            "previous": list(report.previous_chain),
        },
    )


def chain_line(report: DiskReport, trigger: str, *, saved: bool) -> LogLine | None:
    """``disk_tracked`` at first sight; ``chain_changed`` when the chain moved and the new one
    was saved (not when a commit is to be tried again on the old one)."""
    if report.first_sight:
        fields = {"chain": list(report.chain), "running": report.running, "trigger": trigger}
        return LogLine("info", "disk_tracked", fields)
    if report.chain != report.previous_chain and saved:
        return LogLine(
            "info",
            "chain_changed",
            {
                "chain": list(report.chain),
                "previous": list(report.previous_chain),
                "trigger": trigger,
            },
        )
    return None


def checkpoint_counts(health: Sequence[CheckpointHealth]) -> dict[str, int]:
    """Per state (the ``virt_bitmapd_checkpoints`` labels), how many checkpoints of a disk (and
    bitmaps no checkpoint names) are in it."""
    counts = {state.value: 0 for state in State}
    for entry in health:
        counts[entry.state.value] += 1
    return counts


def _health_key(entry: CheckpointHealth) -> str:
    return entry.checkpoint or f"bitmap:{entry.bitmap}"


def health_lines(
    before: Mapping[str, str] | None, health: Sequence[CheckpointHealth]
) -> list[LogLine]:
    """A ``checkpoint_health`` line for each checkpoint whose state changed since the last look
    (``before``: key -> state value; None at first sight, when only the unusable are told):
    a warning when a backup from it is refused or would miss data, info otherwise."""
    lines = []
    for entry in health:
        old = None if before is None else before.get(_health_key(entry))
        if old == entry.state.value or (before is None and entry.state is State.USABLE):
            continue
        if entry.state is State.ORPHAN and before is None:
            continue
        fields: dict[str, Any] = {
            "checkpoint": entry.checkpoint,
            "bitmap": entry.bitmap,
            "state": entry.state.value,
            "next_backup": entry.next_backup.value,
        }
        if old is not None:
            fields["previous_state"] = old
        if entry.reason:
            fields["reason"] = entry.reason
        if entry.layer:
            fields["layer"] = entry.layer
        bad = entry.state in (State.BROKEN, State.UNTRUSTED, State.MISSING)
        lines.append(LogLine("warning" if bad else "info", "checkpoint_health", fields))
    return lines


def health_memory(health: Sequence[CheckpointHealth]) -> dict[str, str]:
    """What ``health_lines`` compares the next look with."""
    return {_health_key(entry): entry.state.value for entry in health}
