"""libvirt's own pull-mode backups, as a backup tool takes them: the oracle of what a checkpoint
really gives.  The exported dirty bitmap is read back over NBD."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from helpers.images import merge_runs, run
from helpers.libvirt_env import URI


class BackupRefused(AssertionError):
    """libvirt would not start the backup; the message is its own."""


def _backup_xml(socket: Path, scratch: Path, incremental: str | None) -> str:
    since = f"<incremental>{incremental}</incremental>" if incremental else ""
    return (
        f"<domainbackup mode='pull'>{since}"
        f"<server transport='unix' socket='{socket}'/>"
        "<disks><disk name='vda' backup='yes' type='file'>"
        f"<scratch file='{scratch}'/></disk></disks></domainbackup>"
    )


def backup_extents(dom: Any, folder: Path, incremental: str | None) -> list[tuple[int, int]]:
    """Start a pull-mode backup of vda (incremental from checkpoint ``incremental``, or full),
    read the runs its dirty bitmap exports (a full one: the runs holding no data), end it.
    Raises BackupRefused with libvirt's words."""
    folder.mkdir(parents=True, exist_ok=True)
    socket, scratch = folder / "backup.sock", folder / "scratch.qcow2"
    scratch.unlink(missing_ok=True)
    description = folder / "backup.xml"
    description.write_text(_backup_xml(socket, scratch, incremental))
    begun = subprocess.run(
        ["virsh", "-c", URI, "backup-begin", dom.name(), str(description)],
        capture_output=True,
        text=True,
        check=False,
    )
    if begun.returncode != 0:
        raise BackupRefused(begun.stderr.strip())
    try:
        options = f"driver=nbd,server.type=unix,server.path={socket},export=vda"
        if incremental:  # a full backup exports no dirty bitmap: its whole disk is the backup
            options += ",x-dirty-bitmap=qemu:dirty-bitmap:backup-vda"
        extents = json.loads(run("qemu-img", "map", "--output=json", "--image-opts", options))
    finally:
        subprocess.run(
            ["virsh", "-c", URI, "domjobabort", dom.name()], capture_output=True, check=False
        )
        scratch.unlink(missing_ok=True)
    # qemu-img map reports dirty extents as "data": false (the sense is inverted).
    return merge_runs((e["start"], e["length"]) for e in extents if not e["data"])


def begin_backup(dom: Any, folder: Path, incremental: str, checkpoint: str) -> None:
    """Start a pull-mode backup of vda incremental from ``incremental`` that takes checkpoint
    ``checkpoint``, as backup tools do, and leave it running (end it with domjobabort)."""
    folder.mkdir(parents=True, exist_ok=True)
    description = folder / "backup.xml"
    description.write_text(_backup_xml(folder / "b.sock", folder / "scratch.qcow2", incremental))
    taken = folder / f"{checkpoint}.xml"
    taken.write_text(
        f"<domaincheckpoint><name>{checkpoint}</name>"
        "<disks><disk name='vda' checkpoint='bitmap'/></disks></domaincheckpoint>"
    )
    run("virsh", "-c", URI, "backup-begin", dom.name(), str(description), str(taken))


def backup_refusal(dom: Any, folder: Path, incremental: str) -> str:
    """libvirt's message refusing an incremental backup from ``incremental``; fails the test if
    libvirt starts it."""
    try:
        backup_extents(dom, folder, incremental)
    except BackupRefused as refusal:
        return str(refusal)
    raise AssertionError(f"libvirt started an incremental backup from {incremental}")
