"""The look's stage that changes images: reconcile each commit, quarantine what cannot be
trusted, heal what can be rebuilt.  Blocking I/O, one transaction each, through the domain's
QEMU when it runs and with qemu-storage-daemon when it does not; only images under the storage
roots are changed.  What to do next is asked of the pure rules (``decide``, ``judge``) with
what each action proved; nothing is re-read in between (``reread`` follows, once).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from ..errors import BitsUnrecoverable, CommitUnproven, CommitUnverifiable, VirtBitmapdError
from ..handover import Handover
from ..heal import HealResult, heal_chain
from ..healing import HealStep
from ..health import Distrust, to_quarantine
from ..live import reconcile_live
from ..model import QCOW2, Image, Reconciliation, Result
from ..planner import plan_union
from ..quarantine import quarantine
from ..readers.chain import ChainNow
from ..reconcile import reconcile_at_rest
from ..top_union import unite_at_rest, unite_live
from ..tracking import Commit
from ..transports.libvirt_monitor import LibvirtMonitor
from .decide import CARRIED, Decision, chain_after, merged_into_after
from .findings import CommitReport, bitmaps_at_risk, untrusted_after
from .gather import Gathered
from .judge import Evidence, distrust, healing_plan
from .unseen_layers import gone_layers, require_layers, with_unseen_layers

__all__ = ["Acted", "Actor"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Acted:
    reports: tuple[CommitReport, ...] = ()
    #: The chain as acting left it, as far as acting proved (``reread`` reads what changed).
    now: ChainNow
    #: What proves where the checkpoints' bits live, once the commits are handled.
    evidence: Evidence
    untrusted: Mapping[str, Distrust] = field(default_factory=dict)
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
        self._handover = handover

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
        if decision.may_quarantine:
            acted = self._quarantine(gathered, acted)
        if decision.may_heal and healing_plan(now.images, evidence, set(untrusted)).steps:
            acted = self._heal(gathered, acted)
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
            )
        except VirtBitmapdError as error:
            return replace(acted, heal_error=error, changed=True, touched=True)
        healed = done.plan.steps if done.result is HealResult.HEALED else ()
        return replace(acted, healed=healed, changed=True, touched=True)

    def _reconcile(
        self, gathered: Gathered, now: ChainNow, commit: Commit, unproven: str | None
    ) -> CommitReport:
        """``unproven``: why nothing but a record of ``virt-bitmapd reconcile`` could prove
        the commit (then nothing is merged: the layers' bitmaps and the base's are untrusted)."""
        last_bitmaps = gathered.last_bitmaps
        remembered = last_bitmaps.get(commit.base)
        base_before = (
            None
            if remembered is None
            else Image(path=commit.base, format=QCOW2, bitmaps=remembered)
        )
        running = gathered.running
        started = time.monotonic()
        try:
            if gathered.last_look_at is not None and commit.top == gathered.old_chain[0]:
                commit = with_unseen_layers(
                    commit, beside=gathered.beside, last_bitmaps=last_bitmaps, live=running
                )
            if self._reconciled_by_command(commit, gathered):
                return CommitReport(
                    commit=commit,
                    live=running,
                    duration=time.monotonic() - started,
                    result=Result.ALREADY_CONSISTENT,
                    note="reconciled by virt-bitmapd reconcile before its layers were deleted",
                )
            if unproven is not None:
                at_risk = bitmaps_at_risk(commit, last_bitmaps, now.images)
                raise CommitUnproven(commit.base, commit.removed, unproven, at_risk)
            require_layers(commit, last_bitmaps, now.images)
            done = self._carry_out(gathered, now, commit, base_before)
        except VirtBitmapdError as error:
            keeps_bits = error.retryable or isinstance(error, CommitUnverifiable)
            return CommitReport(
                commit=commit,
                live=running,
                duration=time.monotonic() - started,
                error=error,
                at_risk=() if keeps_bits else bitmaps_at_risk(commit, last_bitmaps, now.images),
            )
        if done.result in CARRIED and not done.untrusted:
            self._handover.drop(commit.base, commit.removed)  # what a record would say, done
        return CommitReport(
            commit=commit,
            live=running,
            duration=time.monotonic() - started,
            result=done.result,
            plan=done.plan,
            outcome=done.outcome,
            error=BitsUnrecoverable(commit.base, done.why_untrusted, done.untrusted)
            if done.untrusted
            else None,
        )

    def _reconciled_by_command(self, commit: Commit, gathered: Gathered) -> bool:
        """Whether `virt-bitmapd reconcile` left a record for exactly these files, now gone."""
        if not gone_layers(commit):
            return False
        marks = gathered.last_marks
        if marks is not None:
            seen = marks.identities()
        else:  # a state file of an earlier version: what its last complete look saw
            last = gathered.record.fingerprints.get(gathered.target)
            seen = {} if last is None else last.identities()
        return self._handover.take(commit.base, commit.removed, seen) is not None

    def _carry_out(
        self, gathered: Gathered, now: ChainNow, commit: Commit, base_before: Image | None
    ) -> Reconciliation:
        if gathered.running:
            return reconcile_live(
                LibvirtMonitor(gathered.domain),
                now.disk,
                commit,
                storage_roots=self._roots,
                base_before=base_before,
                domain=gathered.name,
            )
        return reconcile_at_rest(
            commit.top, commit.base, storage_roots=self._roots, base_before=base_before
        )
