"""The two readers that judge the soak: libvirt's pull-mode backup (running domains: the
union of a checkpoint's copies over the chain) and an offline export of one copy, as
virtnbdbackup and OpenNebula take it from a shut-off domain (`qemu-nbd -r --bitmap=NAME TOP`).
Each says which blocks it would copy; a block that reads differently since the checkpoint and
is not among them is *missed*."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .tools import VBD, blocks, run, virsh


@dataclass
class Reader:
    """What one reader did over a run."""

    backups: int = 0
    missed_blocks: int = 0
    extra_blocks: int = 0
    refused: int = 0
    #: refused (or, offline, exported from a checkpoint `status` did not call usable), and
    #: `virt-bitmapd status` had said so beforehand
    foreseen: int = 0
    misses: list[str] = field(default_factory=list)

    def judge(self, name: str, exported: set[int], truth: set[int], status: str) -> None:
        self.backups += 1
        missed = truth - exported
        self.missed_blocks += len(missed)
        self.extra_blocks += len(exported - truth)
        if missed:
            self.misses.append(f"{name}: {len(missed)} block(s) missed; status said {status}")


def extents_to_blocks(mapped: str) -> set[int]:
    exported: set[int] = set()
    for extent in json.loads(mapped):
        if not extent["data"]:  # qemu-img map shows dirty extents as "data": false
            exported |= blocks(extent["start"], extent["length"])
    return exported


def online_backup(domain: str, folder: Path, checkpoint: str) -> set[int] | None:
    """The blocks a pull-mode incremental backup from ``checkpoint`` exports; None when
    libvirt refuses it."""
    socket, scratch = folder / "backup.sock", folder / "scratch.qcow2"
    scratch.unlink(missing_ok=True)
    description = folder / "backup.xml"
    description.write_text(
        f"<domainbackup mode='pull'><incremental>{checkpoint}</incremental>"
        f"<server transport='unix' socket='{socket}'/><disks>"
        f"<disk name='vda' backup='yes' type='file'><scratch file='{scratch}'/></disk>"
        "</disks></domainbackup>"
    )
    if virsh("backup-begin", domain, str(description), check=False).returncode != 0:
        return None
    try:
        options = (
            f"driver=nbd,server.type=unix,server.path={socket},export=vda,"
            "x-dirty-bitmap=qemu:dirty-bitmap:backup-vda"
        )
        mapped = run("qemu-img", "map", "--output=json", "--image-opts", options).stdout
    finally:
        end_backup(domain)
        scratch.unlink(missing_ok=True)
    return extents_to_blocks(mapped)


def end_backup(domain: str) -> None:
    """Abort the backup job and wait until it is gone: virsh's `blockcommit --wait` takes a
    late "canceled" event of the backup on the same disk for its own commit's end."""
    virsh("domjobabort", domain, check=False)
    deadline = time.monotonic() + 30
    while "None" not in virsh("domjobinfo", domain, check=False).stdout:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the backup job of {domain} did not end")
        time.sleep(0.05)
    time.sleep(0.2)  # its events are delivered


def offline_export(top: Path, checkpoint: str) -> set[int] | None:
    """The blocks `qemu-nbd -r --bitmap=CHECKPOINT TOP` exports as dirty; None when qemu-nbd
    refuses (the bitmap nowhere in the chain, or inconsistent)."""
    with tempfile.TemporaryDirectory() as folder:
        sock = os.path.join(folder, "nbd.sock")
        command = ["qemu-nbd", "-r", "-t", "-k", sock, "-f", "qcow2", "-B", checkpoint, str(top)]
        deadline = time.monotonic() + 15
        while True:
            server = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
            while not os.path.exists(sock) and server.poll() is None:
                time.sleep(0.02)
            if server.poll() is None:
                break
            said = server.stderr.read() if server.stderr else ""
            if "lock" not in said or time.monotonic() > deadline:  # the daemon may be looking
                return None
            time.sleep(0.2)
        try:
            options = (
                f"driver=nbd,server.type=unix,server.path={sock},"
                f"x-dirty-bitmap=qemu:dirty-bitmap:{checkpoint}"
            )
            mapped = subprocess.run(
                ["qemu-img", "map", "--output=json", "--image-opts", options],
                capture_output=True,
                text=True,
                check=False,
            )
        finally:
            server.terminate()
            server.wait()
    if mapped.returncode != 0:
        return None  # qemu-nbd gave up after binding its socket
    return extents_to_blocks(mapped.stdout)


def status_of(domain: str, config: Path | None, checkpoint: str) -> str:
    """What `virt-bitmapd status` says of ``checkpoint``'s state (and why, if not usable)."""
    entry = _status_entry(domain, config, checkpoint)
    if entry is None:
        return "not asked" if config is None else "not shown"
    state = str(entry["state"])
    return state if state == "usable" else f"{state}: {entry['reason']}"


def offline_status_of(domain: str, config: Path | None, checkpoint: str) -> str:
    """What `virt-bitmapd status` says an offline export of ``checkpoint`` does (and why)."""
    entry = _status_entry(domain, config, checkpoint)
    if entry is None:
        return "not asked" if config is None else "not shown"
    said = str(entry["offline_backup"])
    return f"{said}: {entry['offline_reason']}" if entry["offline_reason"] else said


def _status_entry(domain: str, config: Path | None, checkpoint: str) -> dict[str, Any] | None:
    if config is None:
        return None
    shown = run(*VBD, "status", domain, "--json", "--config", str(config))
    for found in json.loads(shown.stdout)["domains"]:
        for disk in found["disks"]:
            for entry in disk["checkpoints"]:
                if entry["checkpoint"] == checkpoint:
                    return dict(entry)
    return None
