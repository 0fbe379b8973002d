"""What a look means, as tables: how a commit ended, what it leaves untrusted, what is logged."""

from __future__ import annotations

from dataclasses import replace

import pytest

from virt_bitmapd.errors import (
    CommittedLayersGone,
    CommitUnverifiable,
    ImageCorrupt,
    ImageInUse,
    OutsideStorageRoots,
    UnseenLayersForked,
    VirtBitmapdError,
)
from virt_bitmapd.health import CheckpointHealth, NextBackup, State
from virt_bitmapd.look.findings import (
    CommitReport,
    LookResult,
    bitmap_states,
    bitmaps_at_risk,
    result_label,
    untrusted_after,
)
from virt_bitmapd.model import Bitmap, Image, Plan, Result, Skip, SkipReason
from virt_bitmapd.offline_export import OfflineExport
from virt_bitmapd.service.effects import (
    chain_line,
    checkpoint_counts,
    checkpoint_verdicts,
    commit_line,
    health_lines,
    health_memory,
    unverified_commit_line,
)
from virt_bitmapd.tracking import Commit

COMMIT = Commit(removed=("/i/s1",), base="/i/base")
GONE = CommittedLayersGone("/i/base", ("/i/s1",), ("cp1",))


@pytest.mark.parametrize(
    ("result", "error", "label"),
    [
        (Result.RECONCILED, None, "reconciled"),
        (Result.ALREADY_CONSISTENT, None, "already_consistent"),
        (Result.NOTHING_TO_DO, None, "nothing_to_do"),
        (None, GONE, "unrecoverable"),
        (None, UnseenLayersForked("/i/b", "/i/t", ("/i/x",), ()), "unrecoverable"),
        (Result.RECONCILED, GONE, "unrecoverable"),  # done in part, some bitmaps lost
        (None, OutsideStorageRoots("/x", "outside"), "skipped"),
        (None, CommitUnverifiable("/i/s1", "permission denied"), "skipped"),
        (None, ImageCorrupt("/i/s1", "bad"), "failed"),
        (None, ImageInUse("/i/s1", "held"), "failed"),
        (None, None, "failed"),
    ],
)
def test_how_a_commit_ended(
    result: Result | None, error: VirtBitmapdError | None, label: str
) -> None:
    assert result_label(result, error) == label


def _skip(name: str, reason: SkipReason) -> Skip:
    return Skip(bitmap=name, image="/i/s1", reason=reason)


@pytest.mark.parametrize(
    ("report", "untrusted"),
    [
        (CommitReport(commit=COMMIT, live=False, duration=0, result=Result.RECONCILED), set()),
        (CommitReport(commit=COMMIT, live=False, duration=0, error=GONE), {"cp1"}),
        (CommitReport(commit=COMMIT, live=False, duration=0, at_risk=("a", "b")), {"a", "b"}),
        *[
            (
                CommitReport(
                    commit=COMMIT,
                    live=False,
                    duration=0,
                    result=Result.NOTHING_TO_DO,
                    plan=Plan(top="/i/s1", base="/i/base", skipped=(_skip("x", reason),)),
                ),
                {"x"},
            )
            for reason in SkipReason
        ],
    ],
)
def test_what_a_commit_leaves_untrusted(report: CommitReport, untrusted: set[str]) -> None:
    why = untrusted_after([report])
    assert set(why) == untrusted
    assert all("/i/base" in reason for reason in why.values())  # each says which commit


def test_bitmaps_at_risk_are_the_committed_layers_and_the_bases() -> None:
    cp = Bitmap(name="cp1", granularity=65536, recording=True)
    old = Bitmap(name="old", granularity=65536, recording=True)
    base = Image(path="/i/base", format="qcow2", bitmaps=(old,))
    assert bitmaps_at_risk(COMMIT, {"/i/s1": (cp,)}, [base]) == ("cp1", "old")
    # layers never seen: every bitmap of the chain
    top = Image(path="/i/top", format="qcow2", bitmaps=(cp,))
    assert bitmaps_at_risk(COMMIT, {}, [top, base]) == ("cp1", "old")


def test_bitmap_states_count_each_name_once() -> None:
    def b(name: str, recording: bool = True) -> Bitmap:
        return Bitmap(name=name, granularity=65536, recording=recording)

    chain = [
        Image(path="/t", format="qcow2", bitmaps=(b("ok"), b("off", False), b("gap"))),
        Image(path="/m", format="qcow2", bitmaps=(b("ok"), b("below"))),
        Image(path="/b", format="qcow2", bitmaps=(b("ok"), b("gap"))),
    ]
    states, invalid = bitmap_states(chain)
    assert states == {"valid": 1, "disabled": 1, "inconsistent": 0, "broken_chain": 2}
    assert invalid == {"off", "gap", "below"}


@pytest.mark.parametrize(
    ("error", "level"),
    [
        (None, "info"),
        (CommitUnverifiable("/i/s1", "permission denied"), "warning"),
        (GONE, "error"),
        (ImageCorrupt("/i/s1", "bad"), "error"),
    ],
)
def test_a_commit_is_logged_at_the_level_of_its_end(
    error: VirtBitmapdError | None, level: str
) -> None:
    report = CommitReport(
        commit=COMMIT,
        live=True,
        duration=0.1234,
        result=None if error else Result.ALREADY_CONSISTENT,
        error=error,
    )
    line = commit_line(report, "event", "commit")
    assert (line.level, line.event) == (level, "reconciliation")
    assert line.fields["duration"] == 0.123 and line.fields["job_type"] == "commit"
    if isinstance(error, CommittedLayersGone):
        assert line.fields["untrusted"] == ["cp1"] and line.fields["bitmaps"] == ["cp1"]


SEEN = LookResult(domain="d", uuid="u", disk="vda", chain=("/i/b",), previous_chain=("/i/b",))


@pytest.mark.parametrize(
    ("report", "job_type", "completed", "just_handled", "said"),
    [
        (SEEN, "commit", True, False, True),
        (SEEN, "active_commit", True, False, True),
        (SEEN, "active_commit", True, True, False),  # the look at READY handled it
        (SEEN, "active_commit", False, False, False),  # READY itself
        (SEEN, "pull", True, False, False),
        (SEEN, None, False, False, False),
    ],
)
def test_a_commit_event_no_look_could_verify(
    report: LookResult, job_type: str | None, completed: bool, just_handled: bool, said: bool
) -> None:
    line = unverified_commit_line(
        report, "event", job_type, completed=completed, just_handled=just_handled
    )
    assert (line is not None) is said
    if line is not None:
        assert line.fields["result"] == "skipped" and line.level == "warning"


def test_chain_lines() -> None:
    first = LookResult(domain="d", uuid="u", disk="vda", chain=("/a",), first_sight=True)
    moved = LookResult(domain="d", uuid="u", disk="vda", chain=("/a",), previous_chain=("/b",))
    assert chain_line(first, "startup", saved=True).event == "disk_tracked"  # type: ignore[union-attr]
    assert chain_line(moved, "rescan", saved=True).event == "chain_changed"  # type: ignore[union-attr]
    assert chain_line(moved, "rescan", saved=False) is None  # to be tried again
    assert chain_line(SEEN, "rescan", saved=True) is None


def _health(checkpoint: str | None, state: State, next_backup: NextBackup) -> CheckpointHealth:
    return CheckpointHealth(
        disk="vda", bitmap=checkpoint or "orphan", checkpoint=checkpoint, state=state,
        next_backup=next_backup, reason="why", layer="/i/base",
    )  # fmt: skip


USABLE = _health("cp1", State.USABLE, NextBackup.SAFE)
UNTRUSTED = _health("cp2", State.UNTRUSTED, NextBackup.MISSES_DATA)
ORPHAN = _health(None, State.ORPHAN, NextBackup.NONE)


def test_at_first_sight_only_unusable_checkpoints_are_told() -> None:
    lines = health_lines(None, [USABLE, UNTRUSTED, ORPHAN])
    assert [(line.level, line.fields["checkpoint"]) for line in lines] == [("warning", "cp2")]
    assert lines[0].fields["next_backup"] == "would miss data"


def test_each_change_of_state_is_told_once() -> None:
    before = health_memory(None, [USABLE, UNTRUSTED])
    assert health_lines(before, [USABLE, UNTRUSTED]) == []
    healed = _health("cp2", State.USABLE, NextBackup.SAFE)
    (line,) = health_lines(before, [USABLE, healed])
    assert (line.level, line.fields["state"], line.fields["previous_state"]) == (
        "info",
        "usable",
        "untrusted",
    )
    (new,) = health_lines(before, [USABLE, UNTRUSTED, ORPHAN])
    assert new.fields["bitmap"] == "orphan" and new.level == "info"


def test_checkpoint_counts_cover_every_state() -> None:
    counts = checkpoint_counts([USABLE, UNTRUSTED, UNTRUSTED])
    assert counts == {
        "usable": 1,
        "broken": 0,
        "untrusted": 2,
        "missing": 0,
        "orphan_bitmap": 0,
        "busy": 0,
    }


def test_a_block_job_tells_nothing_and_its_end_only_a_real_change() -> None:
    before = health_memory(None, [USABLE, UNTRUSTED])
    busy = [
        _health("cp1", State.BUSY, NextBackup.AFTER_JOB),
        _health("cp2", State.BUSY, NextBackup.AFTER_JOB),
    ]
    assert health_lines(before, busy) == []
    during = health_memory(before, busy)
    assert during == before
    assert health_lines(during, [USABLE, UNTRUSTED]) == []


def test_each_checkpoint_is_published_with_what_check_answers() -> None:
    # orphan bitmaps are counted by state only: no checkpoint, no series of its own
    usable = replace(USABLE, offline=OfflineExport.SAFE)
    assert checkpoint_verdicts([usable, UNTRUSTED, ORPHAN]) == (
        ("cp1", "usable", 0),
        ("cp2", "untrusted", 2),
    )
