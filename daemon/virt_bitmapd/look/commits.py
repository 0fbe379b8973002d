"""The look's stage that reconciles each commit it found: through the domain's QEMU when it
runs, with qemu-storage-daemon when it does not.  What a commit nothing proves, or one
``virt-bitmapd reconcile`` already did, ends as is told by a ``CommitReport``.
"""

from __future__ import annotations

import time

from ..errors import BitsUnrecoverable, CommitUnproven, CommitUnverifiable, VirtBitmapdError
from ..handover import Handover
from ..live import reconcile_live
from ..model import QCOW2, Image, Reconciliation, Result
from ..readers.chain import ChainNow
from ..reconcile import reconcile_at_rest
from ..tracking import Commit
from ..transports.libvirt_monitor import LibvirtMonitor
from .decide import CARRIED
from .findings import CommitReport, bitmaps_at_risk
from .gather import Gathered
from .unseen_layers import gone_layers, require_layers, with_unseen_layers

__all__ = ["CommitActor"]


class CommitActor:
    """Reconciles one commit; configured once with the storage roots and the records of
    ``virt-bitmapd reconcile``."""

    def __init__(self, storage_roots: tuple[str, ...], handover: Handover) -> None:
        self._roots = storage_roots
        self._handover = handover

    def __call__(
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
