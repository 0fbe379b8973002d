"""The pre-backup gate: every reader's answer turned into one exit status, worst disk first."""

from __future__ import annotations

import pytest

from virt_bitmapd.gate import Verdict, gate
from virt_bitmapd.health import CheckpointHealth, NextBackup, State
from virt_bitmapd.offline_export import OfflineExport
from virt_bitmapd.status import DiskStatus, DomainStatus

ONLINE_COMPLETE = (NextBackup.SAFE, NextBackup.WHOLE_DISK)
OFFLINE_COMPLETE = (OfflineExport.SAFE, OfflineExport.WHOLE_DISK)


def health(
    *,
    disk: str = "vda",
    checkpoint: str = "cp1",
    state: State = State.USABLE,
    online: NextBackup = NextBackup.SAFE,
    offline: OfflineExport = OfflineExport.SAFE,
    reason: str = "",
) -> CheckpointHealth:
    return CheckpointHealth(
        disk=disk,
        bitmap=checkpoint,
        checkpoint=checkpoint,
        state=state,
        next_backup=online,
        reason=reason,
        offline=offline,
    )


def domain(*disks: DiskStatus, checkpoints: tuple[str, ...] = ("cp1",)) -> DomainStatus:
    return DomainStatus(
        name="vm1",
        uuid="u",
        running=True,
        disks=disks,
        checkpoints=checkpoints,
        skipped=(("sdb", "raw: holds no bitmaps"),),
    )


def disk(name: str, *entries: CheckpointHealth) -> DiskStatus:
    return DiskStatus(disk=name, chain=(f"/img/{name}.qcow2",), checkpoints=entries)


@pytest.mark.parametrize("online", list(NextBackup))
@pytest.mark.parametrize("offline", list(OfflineExport))
def test_every_pair_of_reader_answers(online: NextBackup, offline: OfflineExport) -> None:
    answer = gate(domain(disk("vda", health(online=online, offline=offline))))
    if online is NextBackup.AFTER_JOB or offline is OfflineExport.AFTER_JOB:
        expected = Verdict.UNKNOWN
    elif online is NextBackup.MISSES_DATA:
        expected = Verdict.MISSES_DATA
    elif online not in ONLINE_COMPLETE:  # libvirt refuses it: the gate, for every reader
        expected = Verdict.FULL
    elif offline is OfflineExport.MISSES_DATA:
        expected = Verdict.MISSES_DATA
    elif offline in OFFLINE_COMPLETE:
        expected = Verdict.INCREMENTAL
    else:  # qemu-nbd refuses it
        expected = Verdict.FULL
    assert answer.verdict is expected, answer


def test_a_busy_disk_is_unknown_whatever_else_is_said() -> None:
    answer = gate(domain(disk("vda", health(state=State.BUSY))))
    assert answer.verdict is Verdict.UNKNOWN and "block job" in answer.reason


@pytest.mark.parametrize(
    ("verdicts", "expected"),
    [
        ((Verdict.INCREMENTAL, Verdict.FULL), Verdict.FULL),
        ((Verdict.FULL, Verdict.UNKNOWN), Verdict.UNKNOWN),
        ((Verdict.UNKNOWN, Verdict.MISSES_DATA), Verdict.MISSES_DATA),
        ((Verdict.INCREMENTAL, Verdict.INCREMENTAL), Verdict.INCREMENTAL),
    ],
)
def test_the_worst_disk_decides(verdicts: tuple[Verdict, ...], expected: Verdict) -> None:
    made = {
        Verdict.INCREMENTAL: {},
        Verdict.FULL: {"online": NextBackup.REFUSED, "reason": "disabled in /img/x"},
        Verdict.MISSES_DATA: {"online": NextBackup.MISSES_DATA},
        Verdict.UNKNOWN: {"state": State.BUSY},
    }
    disks = [
        disk(f"vd{chr(97 + i)}", health(disk=f"vd{chr(97 + i)}", **made[v]))  # type: ignore[arg-type]
        for i, v in enumerate(verdicts)
    ]
    answer = gate(domain(*disks))
    assert answer.verdict is expected
    worst = verdicts.index(expected)
    assert answer.reason.startswith(f"vd{chr(97 + worst)}: ")
    assert [d.verdict for d in answer.disks] == list(verdicts)


def test_the_latest_checkpoint_is_judged_by_default() -> None:
    vda = disk(
        "vda",
        health(checkpoint="cp1", online=NextBackup.REFUSED),
        health(checkpoint="cp2"),
    )
    assert gate(domain(vda, checkpoints=("cp1", "cp2"))).checkpoint == "cp2"
    assert gate(domain(vda, checkpoints=("cp1", "cp2"))).verdict is Verdict.INCREMENTAL
    named = gate(domain(vda, checkpoints=("cp1", "cp2")), "cp1")
    assert named.verdict is Verdict.FULL and "refused by libvirt" in named.reason


def test_no_checkpoint_means_a_full_backup() -> None:
    assert gate(domain(disk("vda"), checkpoints=())).verdict is Verdict.FULL
    unknown_name = gate(domain(disk("vda", health())), "cp9")
    assert unknown_name.verdict is Verdict.FULL and "cp9" in unknown_name.reason


def test_a_disk_the_checkpoint_leaves_out_is_not_judged() -> None:
    answer = gate(domain(disk("vda", health()), disk("vdb")))
    assert answer.verdict is Verdict.INCREMENTAL and [d.name for d in answer.disks] == ["vda"]
    only_vdb = gate(domain(disk("vda", health()), disk("vdb")), disk="vdb")
    assert only_vdb.verdict is Verdict.FULL and "vdb" in only_vdb.reason


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"disk": "vdz"}, "vdz: no such disk"),
        ({"disk": "sdb"}, "sdb: holds no checkpoints: raw"),
        ({"memory_error": "/var/lib/virt-bitmapd/domains: cannot be read"}, "memory"),
    ],
)
def test_what_cannot_be_judged_is_unknown(kwargs: dict[str, str], words: str) -> None:
    answer = gate(domain(disk("vda", health())), **kwargs)
    assert answer.verdict is Verdict.UNKNOWN and words in answer.reason, answer


def test_an_unreadable_disk_or_domain_is_unknown() -> None:
    broken = DiskStatus(disk="vdb", error="/img/vdb.qcow2: not a qcow2 image")
    answer = gate(domain(disk("vda", health()), broken))
    assert answer.verdict is Verdict.UNKNOWN and answer.reason.startswith("vdb: cannot be read")
    lost = DomainStatus(name="vm1", uuid="u", running=False, error="libvirt: gone")
    assert gate(lost).verdict is Verdict.UNKNOWN


def test_exit_status_and_labels_follow_the_monitoring_plugins() -> None:
    assert [int(v) for v in Verdict] == [0, 1, 2, 3]
    assert [v.label for v in Verdict] == ["OK", "WARNING", "CRITICAL", "UNKNOWN"]
