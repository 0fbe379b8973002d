"""What `qemu-nbd --bitmap` gives an offline reader, against a table of chains; and `status`
saying it beside libvirt's answer."""

from __future__ import annotations

from typing import Any

import pytest

from virt_bitmapd.checkpoint_xml import Checkpoint, CheckpointDisk
from virt_bitmapd.health import NextBackup, State, disk_health
from virt_bitmapd.model import Bitmap, Image
from virt_bitmapd.offline_export import OfflineExport, offline_export
from virt_bitmapd.printing import status_json, status_text
from virt_bitmapd.status import DiskStatus, DomainStatus, HostStatus

K64 = 65536


def image(path: str, *copies: tuple[str, bool, bool]) -> Image:
    """Copies as (name, recording, inconsistent)."""
    bitmaps = tuple(
        Bitmap(name=name, granularity=K64, recording=rec, inconsistent=inc)
        for name, rec, inc in copies
    )
    return Image(path=path, format="qcow2", bitmaps=bitmaps)


OK = ("cp1", True, False)
OFF = ("cp1", False, False)
BAD = ("cp1", True, True)


@pytest.mark.parametrize(
    ("top", "base", "flags", "verdict"),
    [
        ((), (), {}, OfflineExport.REFUSED),  # "not found"
        ((BAD,), (OK,), {}, OfflineExport.REFUSED),  # inconsistent: refused
        ((), (OK,), {"top_united": True}, OfflineExport.MISSES_DATA),  # a backing file's copy
        ((OFF,), (), {}, OfflineExport.MISSES_DATA),  # disabled, exported all the same
        ((OK,), (), {"untrusted": True}, OfflineExport.MISSES_DATA),
        ((OK,), (OK,), {"filled": True}, OfflineExport.WHOLE_DISK),
        ((OK,), (OK,), {}, OfflineExport.MISSES_DATA),  # the union not known to be there
        ((OK,), (OK,), {"top_united": True}, OfflineExport.SAFE),
        ((OK,), (OK,), {"top_united": True, "valid": False}, OfflineExport.MISSES_DATA),
        ((OK,), (), {}, OfflineExport.SAFE),  # one copy: nothing below to miss
    ],
)
def test_what_an_offline_export_gives(
    top: tuple[Any, ...], base: tuple[Any, ...], flags: dict[str, bool], verdict: OfflineExport
) -> None:
    options = {"untrusted": False, "filled": False, "valid": True, "top_united": False} | flags
    got, why = offline_export((image("/top", *top), image("/base", *base)), "cp1", **options)
    assert got is verdict, why
    assert bool(why) == (verdict not in (OfflineExport.SAFE, OfflineExport.WHOLE_DISK))


def test_status_says_what_each_reader_does() -> None:
    """libvirt refuses a checkpoint the top lacks; qemu-nbd exports the base's copy, short."""
    cp1 = Checkpoint(
        name="cp1", created=1, disks=(CheckpointDisk(target="vda", bitmap="cp1", chain_then=()),)
    )
    (health,) = disk_health([image("/top"), image("/base", OK)], [cp1], "vda", {})
    assert (health.state, health.next_backup) == (State.BROKEN, NextBackup.REFUSED)
    assert health.offline is OfflineExport.MISSES_DATA and "/base" in health.offline_reason
    (united,) = disk_health(
        [image("/top", OK), image("/base", OK)], [cp1], "vda", {}, top_united=True
    )
    assert (united.next_backup, united.offline) == (NextBackup.SAFE, OfflineExport.SAFE)


def test_status_prints_the_offline_answer_where_it_differs_from_libvirts() -> None:
    cp1 = Checkpoint(
        name="cp1", created=1, disks=(CheckpointDisk(target="vda", bitmap="cp1", chain_then=()),)
    )
    cp2 = Checkpoint(
        name="cp2", created=2, disks=(CheckpointDisk(target="vda", bitmap="cp2", chain_then=()),)
    )
    chain = [image("/top", ("cp2", True, False)), image("/base", OK, ("cp2", True, False))]
    health = disk_health(chain, [cp1, cp2], "vda", {}, top_united=True)
    disk = DiskStatus(disk="vda", chain=("/top", "/base"), checkpoints=health)
    host = HostStatus(domains=(DomainStatus(name="vm1", uuid="u", running=False, disks=(disk,)),))
    text = status_text(host).splitlines()
    at = next(i for i, line in enumerate(text) if line.strip().startswith("cp1"))
    assert "refused by libvirt" in text[at]
    assert "offline export: would miss data" in text[at + 1] and "/base" in text[at + 1]
    assert "offline export" not in "".join(text[at + 2 :])  # cp2: safe for both
    entries = status_json(host)["domains"][0]["disks"][0]["checkpoints"]
    assert {e["checkpoint"]: e["offline_backup"] for e in entries} == {
        "cp1": "would miss data",
        "cp2": "safe",
    }
