"""One look at one disk: the stages in order, each once.

    gather (reads) -> decide (pure) -> act (changes) -> reread (what acting changed)
    -> judge (pure)

The result is a value (``findings.LookResult``) naming the stages it ran; the service turns it
into effects and applies them.  Blocking code, run off the event loop.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

import libvirt

from ..checkpoint_xml import names_of
from ..errors import VirtBitmapdError
from ..fingerprints import Fingerprint, LayerStat, change_time_ns, stat_layers
from ..handover import Handover
from ..health import CheckpointHealth
from ..readers.chain import ChainNow, current_chain
from ..state import StateStore
from .act import Acted, Actor
from .decide import SAFEGUARDS, bitmaps_to_remember, decide, is_clean, united_after
from .findings import LookResult, bitmap_states
from .gather import Gathered, gather
from .judge import judge
from .proof import marks_after

__all__ = ["Look"]


class Look:
    """Configured once with the daemon's settings; called once per look."""

    def __init__(
        self,
        store: StateStore,
        storage_roots: Sequence[str],
        handover: Handover,
        *,
        untrusted_policy: str = "fill",
        heal: bool = False,
        log_dir: str | None = None,
    ) -> None:
        """``log_dir``: where libvirt keeps the domains' QEMU logs (``readers.qemu_log``);
        without it, only libvirt's event or a record of ``virt-bitmapd reconcile`` proves a
        commit."""
        self._store = store
        self._log_dir = log_dir
        self._roots = tuple(storage_roots)
        self._act = Actor(self._roots, handover)
        self._safeguard = SAFEGUARDS.get(untrusted_policy)
        self._heal = heal

    def __call__(
        self,
        domain: libvirt.virDomain,
        target: str,
        *,
        copied: bool = False,
        job_done: bool = False,
        trust_last_look: bool = False,
    ) -> LookResult:
        """``copied``: a block copy of this disk just completed; ``job_done``: a commit or
        pull of it did (libvirt's event); ``trust_last_look`` (a startup): a shut-off disk
        nothing says changed is not read again."""
        ran = ["gather"]  # each stage as it runs: what the result says it did
        gathered = gather(
            domain,
            target,
            self._store,
            self._roots,
            trust_last_look=trust_last_look,
            log_dir=self._log_dir,
        )
        result = LookResult(
            domain=gathered.name,
            uuid=gathered.uuid,
            disk=target,
            running=gathered.running,
            generation=gathered.generation,
            started_at=gathered.started_ns / 1e9,
            stages=tuple(ran),
        )
        if gathered.skipped is not None or gathered.error is not None or gathered.now is None:
            return _ended(result, gathered)
        decision = decide(
            gathered,
            copied=copied,
            job_done=job_done,
            safeguard=self._safeguard,
            heal=self._heal,
        )
        ran.append("decide")
        acted = self._act(gathered, decision)
        ran.append("act")
        now, stats, left = _reread(gathered, acted)
        ran.append("reread")
        united = united_after(acted.now.paths, now, union_failed=acted.union_error is not None)
        health: tuple[CheckpointHealth, ...] = ()
        if gathered.checkpoint_error is None:
            health = judge(
                now.images, acted.evidence, acted.untrusted, job=now.job, united=united is not None
            )
            ran.append("judge")
        states, invalid = bitmap_states(now.images)
        clean = is_clean(
            acted.reports,
            (
                gathered.checkpoint_error,
                acted.fill_error,
                acted.quarantine_error,
                acted.heal_error,
                acted.union_error,
            ),
            now.job_running,
        )
        fingerprint = Fingerprint.of(now.images, stats, names_of(gathered.checkpoints))
        return replace(
            result,
            chain=now.paths,
            commits=acted.reports,
            first_sight=target not in gathered.record.chains,
            previous_chain=gathered.old_chain,
            bitmap_states=states,
            untrusted=tuple(sorted(set(acted.untrusted) | invalid)),
            health=health,
            checkpoint_error=gathered.checkpoint_error,
            filled=acted.filled,
            fill_error=acted.fill_error,
            quarantined=acted.quarantined,
            quarantine_error=acted.quarantine_error,
            healed=acted.healed,
            heal_error=acted.heal_error,
            united=acted.united,
            union_error=acted.union_error,
            fingerprint=fingerprint if clean else None,
            left_stats=left,
            marks=marks_after(gathered, now.paths, left, touched=acted.touched),
            distrust=acted.untrusted,
            layer_bitmaps=bitmaps_to_remember(now, gathered.last_bitmaps),
            merged_into=acted.evidence.merged_into,
            births=acted.evidence.births,
            fills=acted.evidence.filled,
            united_chain=united,
            stages=tuple(ran),
        )


def _ended(result: LookResult, gathered: Gathered) -> LookResult:
    """A look that ends after gathering: the disk is not there or not ours, or a read failed."""
    return replace(result, skipped=gathered.skipped, error=gathered.error)


def _reread(
    gathered: Gathered, acted: Acted
) -> tuple[ChainNow, dict[str, LayerStat], dict[str, LayerStat]]:
    """The chain as acting left it, read again only when acting changed something; each
    chain layer's stat from before that read (for the fingerprint); and every layer's stat as
    the look left it (old chain and new: its own writes included, they are no news)."""
    now = acted.now
    if not acted.touched:
        before = dict(gathered.stats_before)
        found = _found_on_the_way(now.paths, before)
        return now, before | _older_than(gathered.started_ns, found), before | found
    left = stat_layers({*gathered.old_chain, *now.paths})  # before the read, as always
    if not acted.changed:
        return now, {}, left
    try:
        now = current_chain(gathered.domain, now.disk, gathered.running)
    except VirtBitmapdError:  # what acting proved stands, but proves no fingerprint
        return now, {}, left
    found = _found_on_the_way(now.paths, left)
    return now, left | _older_than(gathered.started_ns, found), left | found


def _found_on_the_way(paths: Sequence[str], stats: Mapping[str, LayerStat]) -> dict[str, LayerStat]:
    """Stats of the layers the look found on its way (not stat'ed before it read them)."""
    return stat_layers(path for path in paths if stats.get(path) is None)


def _older_than(started_ns: int, found: Mapping[str, LayerStat]) -> dict[str, LayerStat]:
    """Those of ``found`` whose change time is older than the look: what a stat before the
    read would have given (a change time cannot be set back)."""
    return {
        path: st for path, st in found.items() if st is not None and change_time_ns(st) < started_ns
    }
