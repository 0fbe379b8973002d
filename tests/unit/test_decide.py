"""The look's pure rules, as tables: which commits a look acts on, where their bits live after,
what the chain holds once a reconciliation proved its merges, and what the look leaves."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from virt_bitmapd.checkpoint_xml import Checkpoint, CheckpointDisk
from virt_bitmapd.domain_xml import Disk, Layer
from virt_bitmapd.errors import ImageCorrupt, ImageInUse
from virt_bitmapd.fingerprints import Fingerprint
from virt_bitmapd.health import Distrust
from virt_bitmapd.look.decide import (
    Safeguard,
    bitmaps_to_remember,
    chain_after,
    decide,
    is_clean,
    keeps_old_chain,
    merged_into_after,
    united_after,
)
from virt_bitmapd.look.findings import NO_SUCH_DISK, CommitReport, LookResult
from virt_bitmapd.look.gather import Gathered
from virt_bitmapd.model import (
    QCOW2,
    Bitmap,
    BitmapMerge,
    Image,
    MergeOutcome,
    Outcome,
    Plan,
    Result,
)
from virt_bitmapd.readers.chain import ChainNow
from virt_bitmapd.readers.host_disks import HostDisks
from virt_bitmapd.service.effects import (
    drops_record,
    fingerprint_to_keep,
    saves_record,
    skip_line,
)
from virt_bitmapd.state import DomainState
from virt_bitmapd.tracking import Commit

K64 = 65536


def chain_now(*paths: str, bitmaps: dict[str, tuple[Bitmap, ...]] | None = None) -> ChainNow:
    disk = Disk(
        target="vda",
        layers=tuple(Layer(path=p, format=QCOW2, index=None) for p in paths),
        complete=True,
    )
    images = tuple(Image(path=p, format=QCOW2, bitmaps=(bitmaps or {}).get(p, ())) for p in paths)
    return ChainNow(disk=disk, paths=paths, images=images)


def gathered(
    old: tuple[str, ...],
    now: ChainNow,
    *,
    running: bool = False,
    beside: dict[str, str] | None = None,
    host: HostDisks | None = None,
    checkpoints: tuple[Checkpoint, ...] = (),
    **more: Any,
) -> Gathered:
    record = DomainState(uuid="u1", name="vm1", chains={"vda": old})
    return Gathered(
        domain=None,
        name="vm1",
        uuid="u1",
        target="vda",
        running=running,
        generation=0,
        started_ns=0,
        record=record,
        now=now,
        beside=beside or {},
        host=host,
        checkpoints=checkpoints,
        **more,
    )


def report(removed: tuple[str, ...], base: str, **ending: Any) -> CommitReport:
    return CommitReport(
        commit=Commit(removed=removed, base=base), live=False, duration=0.1, **ending
    )


def test_a_layer_gone_is_a_commit_into_the_one_below() -> None:
    decision = decide(
        gathered(("/top", "/s1", "/base"), chain_now("/top", "/base")),
        copied=False,
        safeguard=Safeguard.FILL,
        heal=True,
    )
    assert decision.commits == (Commit(removed=("/s1",), base="/base"),)
    assert decision.safeguard is Safeguard.FILL and decision.may_heal


def test_what_a_completed_block_copy_replaced_is_no_commit() -> None:
    before = ("/top", "/base")
    born = Checkpoint(
        name="cp1", disks=(CheckpointDisk(target="vda", bitmap="cp1", chain_then=("/top",)),)
    )
    look = gathered(before, chain_now("/copy", "/base"), checkpoints=(born,))
    assert decide(look, copied=False, safeguard=Safeguard.FILL, heal=False).commits != ()
    decision = decide(look, copied=True, safeguard=Safeguard.FILL, heal=False)
    assert decision.commits == ()
    assert decision.copied_into == {"/top": "/copy"}


def test_a_block_copy_vouches_only_for_the_layers_it_replaced() -> None:
    """A birth layer gone before the copy (never seen, lost without its bits) is not the
    copy's: only what the copy replaced lives on in it."""
    replaced = Checkpoint(
        name="cp1", disks=(CheckpointDisk(target="vda", bitmap="cp1", chain_then=("/top",)),)
    )
    unseen = Checkpoint(
        name="cp2", disks=(CheckpointDisk(target="vda", bitmap="cp2", chain_then=("/lost",)),)
    )
    look = gathered(("/top", "/base"), chain_now("/copy", "/base"), checkpoints=(replaced, unseen))
    assert decide(look, copied=True, safeguard=Safeguard.FILL, heal=False).copied_into == {
        "/top": "/copy"
    }


def test_a_hidden_commit_is_found_from_a_file_in_no_domains_chain() -> None:
    beside = {"/gone": "/base", "/other-vm": "/base"}
    host = HostDisks(raw_files=frozenset(), chain_files=frozenset({"/other-vm"}))
    look = gathered(("/top", "/base"), chain_now("/top", "/base"), beside=beside, host=host)
    commits = decide(look, copied=False, safeguard=Safeguard.FILL, heal=False).commits
    assert [(c.removed, c.base) for c in commits] == [(("/gone",), "/base")]


@pytest.mark.parametrize(
    ("running", "checkpoint_error", "job_running", "heal", "expected"),
    [
        (False, None, False, True, (True, True)),
        (True, None, False, True, (True, False)),  # healing is at rest only
        (False, ImageCorrupt("/x", "bad"), False, True, (True, False)),  # nothing to prove from
        (True, None, True, True, (False, False)),  # libvirt may be half-way through bitmaps
        (False, None, False, False, (True, False)),  # policy
    ],
)
def test_when_a_look_may_fill_or_heal(
    running: bool, checkpoint_error: Any, job_running: bool, heal: bool, expected: Any
) -> None:
    now = chain_now("/top")
    job = "backup" if job_running else None
    now = ChainNow(disk=now.disk, paths=now.paths, images=now.images, job=job)
    look = gathered(("/top",), now, running=running, checkpoint_error=checkpoint_error)
    decision = decide(look, copied=False, safeguard=Safeguard.FILL, heal=heal)
    assert (decision.safeguard is Safeguard.FILL, decision.may_heal) == expected


def test_where_committed_bits_live_follows_commits_that_carried_them() -> None:
    carried = report(("/s2",), "/s1", result=Result.RECONCILED)
    failed = report(("/s3",), "/base", error=ImageInUse("/base", "held"))
    merged = merged_into_after(
        {"/s0": "/s1", "/old": "/long-gone"}, [carried, failed], ("/top", "/s1"), {}
    )
    # /s0 reaches the chain through /s1; /old leads nowhere; a failed commit proves nothing
    assert merged == {"/s0": "/s1", "/s2": "/s1"}
    assert merged_into_after({}, [], ("/copy",), {"/top": "/copy"}) == {"/top": "/copy"}


def test_a_proven_reconciliation_shows_in_the_chain_without_reading_it() -> None:
    recording = Bitmap(name="cp1", granularity=K64, recording=True)
    now = chain_now("/top", "/base", bitmaps={"/top": (recording,)})
    plan = Plan(
        top="/s1",
        base="/base",
        merges=(BitmapMerge(bitmap="cp2", granularity=K64, create_in_base=True, sources=("/s1",)),),
    )
    outcome = Outcome(
        plan=plan,
        merges=(
            MergeOutcome(bitmap="cp2", created=True, dirty_bytes_before=0, dirty_bytes_after=K64),
        ),
    )
    done = report(("/s1",), "/base", result=Result.RECONCILED, plan=plan, outcome=outcome)
    after = chain_after(now, [done])
    assert after.images[1].bitmaps == (Bitmap(name="cp2", granularity=K64, recording=True),)
    assert after.images[0] == now.images[0]
    assert chain_after(now, [report(("/s1",), "/base", error=ImageInUse("/b", "x"))]) == now


def test_a_look_is_clean_only_when_nothing_failed_and_no_job_ran() -> None:
    fine = report(("/s1",), "/base", result=Result.RECONCILED)
    deferred = report(("/s1",), "/base", error=ImageInUse("/base", "held"))
    assert is_clean([fine], [None, None], job_running=False)
    assert not is_clean([deferred], [None], job_running=False)
    assert not is_clean([fine], [ImageCorrupt("/x", "y")], job_running=False)
    assert not is_clean([], [], job_running=True)
    assert keeps_old_chain([deferred]) and not keeps_old_chain([fine])


def test_bitmaps_seen_during_a_block_job_are_not_remembered() -> None:
    old = {"/base": (Bitmap(name="cp1", granularity=K64, recording=True),)}
    now = chain_now("/base")
    assert bitmaps_to_remember(now, old) == {"/base": ()}
    busy = ChainNow(disk=now.disk, paths=now.paths, images=now.images, job="copy")
    assert bitmaps_to_remember(busy, old) == old


@pytest.mark.parametrize(
    ("result", "saves", "drops"),
    [
        (LookResult(domain="d", uuid="u", disk="vda", chain=("/a",)), True, False),
        (LookResult(domain="d", uuid="u", disk="vda", skipped=NO_SUCH_DISK), False, True),
        (LookResult(domain="d", uuid="u", disk="vda", skipped="outside"), False, False),
        (LookResult(domain="d", uuid="u", disk="vda", error=ImageCorrupt("/a", "x")), False, False),
        (
            LookResult(
                domain="d",
                uuid="u",
                disk="vda",
                chain=("/a",),
                commits=(report(("/s1",), "/a", error=ImageInUse("/a", "held")),),
            ),
            False,  # tried again on the old chain
            False,
        ),
    ],
)
def test_what_the_state_directory_keeps(result: LookResult, saves: bool, drops: bool) -> None:
    assert (saves_record(result), drops_record(result)) == (saves, drops)


def test_a_skipped_disk_is_a_warning_only_when_it_should_have_been_looked_at() -> None:
    assert skip_line("raw disk", expected=True).level == "info"
    assert skip_line("outside the storage roots", expected=False).level == "warning"
    assert skip_line("raw disk", expected=True).event == "disk_skipped"


def test_a_running_disk_with_distrusted_bitmaps_is_read_at_every_rescan() -> None:
    """A monitor command can make a quarantined bitmap record again and leave no trace a rescan
    compares: such a disk keeps no fingerprint to be spared by."""
    seen = Fingerprint(("/a",), (None,))
    distrust = {"cp1": Distrust("a commit could not carry it")}
    base = LookResult(domain="d", uuid="u", disk="vda", chain=("/a",), fingerprint=seen)
    assert fingerprint_to_keep(replace(base, running=True)) == seen
    assert fingerprint_to_keep(replace(base, distrust=distrust)) == seen  # its file shows it
    assert fingerprint_to_keep(replace(base, running=True, distrust=distrust)) is None


def test_the_top_is_united_when_its_chain_is_not_the_one_last_united_or_it_gained_a_bitmap() -> (
    None
):
    """A reader exporting the top's copy alone needs the copies below merged into it after a
    snapshot, a commit, a chain that changed while a job ran (no union then), or a bitmap made
    in the top at rest (``virt-bitmapd heal``)."""
    cp1 = Bitmap(name="cp1", granularity=K64, recording=True)
    now = chain_now("/top", "/base", bitmaps={"/top": (cp1,), "/base": (cp1,)})

    def unites(united: tuple[str, ...] | None, top_before: tuple[Bitmap, ...]) -> bool:
        look = gathered(("/top", "/base"), now)
        look.record.bitmaps["vda"] = {"/top": top_before, "/base": (cp1,)}
        if united is not None:
            look.record.united["vda"] = united
        return decide(look, copied=False, safeguard=Safeguard.FILL, heal=False).may_unite

    assert unites(("/base",), ())  # a snapshot since the last union
    assert unites(None, (cp1,))  # never united (a state file of an earlier version)
    assert unites(("/top", "/base"), ())  # cp1 made in the top since (healed)
    assert not unites(("/top", "/base"), (cp1,))  # nothing changed: nothing to do


def test_a_look_leaves_its_chain_united_unless_a_union_failed_a_job_ran_or_it_moved() -> None:
    now = chain_now("/top", "/base")
    assert united_after(("/top", "/base"), now, union_failed=False) == ("/top", "/base")
    assert united_after(("/top", "/base"), now, union_failed=True) is None
    assert united_after(("/base",), now, union_failed=False) is None  # a snapshot meanwhile
    busy = ChainNow(disk=now.disk, paths=now.paths, images=now.images, job="backup")
    assert united_after(("/top", "/base"), busy, union_failed=False) is None
