"""The look's stage that changes images: reconcile each commit (``commits``), fill (or disable)
what cannot be trusted, heal what can be rebuilt, unite the top's copies. Blocking I/O, one
transaction each, through the domain's QEMU when it runs and with qemu-storage-daemon when it
does not; only images under the storage roots are changed. What to do next is asked of the pure
rules (``decide``, ``judge``) with what each action proved; nothing is re-read in between
(``reread`` follows, once).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from ..checkpoint_xml import bitmap_created
from ..errors import CleanupFailed, VirtBitmapdError
from ..fill import fill
from ..filling import Filled, FillStep, plan_fill
from ..handover import Handover
from ..heal import HealResult, heal_chain
from ..healing import HealStep
from ..health import Distrust, to_quarantine
from ..model import Bitmap
from ..planner import plan_union
from ..quarantine import quarantine
from ..readers.chain import ChainNow
from ..top_union import unite_at_rest, unite_live
from ..transports.libvirt_monitor import LibvirtMonitor
from .commits import CommitActor
from .decide import Decision, Safeguard, chain_after, merged_into_after, with_bitmaps
from .findings import CommitReport, untrusted_after
from .gather import Gathered
from .judge import Evidence, distrust, healing_plan, missing_in_top

__all__ = ["Acted", "Actor"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Acted:
    reports: tuple[CommitReport, ...] = ()
    #: The chain as acting left it, as far as acting proved (``reread`` reads what changed).
    now: ChainNow
    #: What proves where the checkpoints' bits live, once the commits are handled.
    evidence: Evidence
    untrusted: Mapping[str, Distrust] = field(default_factory=dict)
    #: Bitmaps this look gave every bit, each with why it was untrusted; and a failure to.
    filled: Mapping[str, str] = field(default_factory=dict)
    fill_error: VirtBitmapdError | None = None
    #: Bitmaps disabled, each with why it is untrusted.
    quarantined: Mapping[str, str] = field(default_factory=dict)
    quarantine_error: VirtBitmapdError | None = None
    healed: tuple[HealStep, ...] = ()
    heal_error: VirtBitmapdError | None = None
    #: Bitmaps whose top copy gained bits from the copies below it, and a failure to.
    united: tuple[str, ...] = ()
    union_error: VirtBitmapdError | None = None
    #: Whether anything may have changed an image (so the chain is read again).
    changed: bool = False
    #: Whether an image was opened for writing at all (a reconciliation at rest that failed
    #: still opened its base): the look's own writes, no news to the next look.
    touched: bool = False


class Actor:
    """What acting needs beyond the look's values, configured once."""

    def __init__(self, storage_roots: tuple[str, ...], handover: Handover) -> None:
        self._roots = storage_roots
        self._reconcile = CommitActor(storage_roots, handover)

    def __call__(self, gathered: Gathered, decision: Decision) -> Acted:
        now = gathered.now
        assert now is not None, "act needs a chain"
        reports = tuple(
            self._reconcile(gathered, now, commit, decision.unproven.get(commit))
            for commit in decision.commits
        )
        changed = any(r.outcome is not None and r.outcome.changed for r in reports)
        touched = changed or (bool(reports) and not gathered.running)
        now = chain_after(now, reports)
        merged = merged_into_after(
            gathered.record.merged_into.get(gathered.target, {}),
            reports,
            now.paths,
            decision.copied_into,
        )
        evidence = Evidence(
            target=gathered.target,
            checkpoints=gathered.checkpoints,
            merged_into=merged,
            births=decision.births,
            filled=decision.filled,
        )
        remembered = gathered.record.untrusted.get(gathered.target, {})
        untrusted = distrust(
            now.images,
            evidence,
            remembered=remembered,
            after_commits=untrusted_after(reports),
            job=now.job,
        )
        acted = Acted(
            reports=reports,
            now=now,
            evidence=evidence,
            untrusted=untrusted,
            changed=changed,
            touched=touched,
        )
        if decision.may_heal and healing_plan(now.images, evidence, set(untrusted)).steps:
            acted = self._heal(gathered, acted)  # a few blocks more, before a whole disk
        if decision.safeguard is Safeguard.FILL:
            acted = self._fill(gathered, acted)
        if decision.safeguard is not None:
            acted = self._quarantine(gathered, acted)  # what filling could not make complete
        if acted.healed or (decision.may_unite and not plan_union(now.images).is_empty):
            acted = self._unite(gathered, acted)  # a healed copy holds its own layer's only
        return acted

    def _unite(self, gathered: Gathered, acted: Acted) -> Acted:
        """The top's copy of each bitmap made to hold the copies below it (``top_union``)."""
        at_rest = not gathered.running
        try:
            if gathered.running:
                monitor = LibvirtMonitor(gathered.domain)
                done = unite_live(monitor, acted.now.disk, storage_roots=self._roots)
            else:
                done = unite_at_rest(acted.now.paths, storage_roots=self._roots)
        except VirtBitmapdError as error:
            return replace(acted, union_error=error, changed=True, touched=acted.touched or at_rest)
        united = tuple(merge.bitmap for merge in done.merges if merge.changed)
        return replace(
            acted,
            united=united,
            changed=acted.changed or bool(united),
            touched=acted.touched or at_rest,
        )

    def _fill(self, gathered: Gathered, acted: Acted) -> Acted:
        """Every bit set in the top's copy of each untrusted bitmap, and of each checkpoint
        bitmap the top lacks (``fill``): complete from then on, so its distrust is settled and
        the fill is where its bits begin."""
        missing = missing_in_top(acted.now.images, gathered.checkpoints, gathered.target)
        reasons = missing | {name: distrust.why for name, distrust in acted.untrusted.items()}
        steps = plan_fill(acted.now.images, reasons)
        if not steps:
            return acted
        error: VirtBitmapdError | None = None
        try:
            fill(
                acted.now.disk,
                steps,
                running=gathered.running,
                monitor=lambda: LibvirtMonitor(gathered.domain),
                storage_roots=self._roots,
            )
        except CleanupFailed as left:  # complete; a helper node goes at the next connection
            error = left
        except VirtBitmapdError as failed:
            return replace(acted, fill_error=failed, changed=True, touched=True)
        names = {step.bitmap for step in steps}
        why = {name: reasons[name] for name in sorted(names)}
        created = bitmap_created(gathered.checkpoints, gathered.target)
        fills = {
            name: Filled(
                why=reason,
                checkpoint_created=created.get(name, 0),
                chain=acted.now.paths,
                at=time.time(),
            )
            for name, reason in why.items()
        }
        return replace(
            acted,
            now=with_bitmaps(acted.now, {acted.now.paths[0]: _recording(steps)}),
            evidence=replace(acted.evidence, filled={**acted.evidence.filled, **fills}),
            untrusted={k: v for k, v in acted.untrusted.items() if k not in names},
            filled=why,
            fill_error=error,
            changed=True,
            touched=True,
        )

    def _quarantine(self, gathered: Gathered, acted: Acted) -> Acted:
        names = to_quarantine(acted.now.images, acted.untrusted)
        if not names:
            return acted
        try:
            quarantine(
                acted.now.disk,
                names,
                running=gathered.running,
                monitor=lambda: LibvirtMonitor(gathered.domain),
                storage_roots=self._roots,
            )
        except VirtBitmapdError as error:
            return replace(acted, quarantine_error=error, changed=True, touched=True)
        why = {name: acted.untrusted[name].why for name in names}
        return replace(acted, quarantined=why, changed=True, touched=True)

    def _heal(self, gathered: Gathered, acted: Acted) -> Acted:
        try:
            done = heal_chain(
                acted.now.paths[0],
                storage_roots=self._roots,
                formats=acted.now.disk.formats,
                checkpoints=gathered.checkpoints,
                target=gathered.target,
                untrusted=set(acted.untrusted),
                merged_into=dict(acted.evidence.merged_into),
                births=acted.evidence.births,
                filled=acted.evidence.filled,
            )
        except VirtBitmapdError as error:
            return replace(acted, heal_error=error, changed=True, touched=True)
        healed = done.plan.steps if done.result is HealResult.HEALED else ()
        added: dict[str, list[HealStep]] = {}
        for step in healed:
            added.setdefault(step.image, []).append(step)
        now = with_bitmaps(acted.now, {path: _recording(steps) for path, steps in added.items()})
        return replace(acted, now=now, healed=healed, changed=True, touched=True)


def _recording(steps: Sequence[FillStep | HealStep]) -> dict[str, Bitmap]:
    """The bitmaps ``steps`` made, recording and consistent (each action checked that before
    it ended well)."""
    return {
        step.bitmap: Bitmap(name=step.bitmap, granularity=step.granularity, recording=True)
        for step in steps
    }
