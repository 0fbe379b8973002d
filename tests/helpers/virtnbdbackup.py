"""Debian's virtnbdbackup and virtnbdrestore as the tests run them, and the wrapper that puts
``virt-bitmapd check`` in front of virtnbdbackup (contrib/virtnbdbackup-checked)."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

from helpers.libvirt_env import REPO

WRAPPER = REPO / "contrib" / "virtnbdbackup-checked"


def tool(name: str, folder: Path, *args: str) -> None:
    """Debian's virtnbdbackup or virtnbdrestore, its sockets, qemu-nbd pid files and logs kept
    in ``folder`` (by default they are left in /var/tmp and /tmp)."""
    binary = shutil.which(name)
    assert binary is not None, f"{name} is not installed (scripts/setup.sh installs it)"
    scratch = folder / "tool"
    scratch.mkdir(exist_ok=True)
    # a socket of its own each time: a qemu-nbd of the call before may still be going away
    socket = scratch / f"{name}-{uuid.uuid4().hex[:8]}.sock"
    command = [binary, *args, "-n", "-f", str(socket)]
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "TMPDIR": str(scratch)},
    )
    assert result.returncode == 0, f"{command} failed ({result.returncode}): {result.stderr}"


def virtnbdbackup(dom: Any, level: str, output: Path) -> None:
    """``virtnbdbackup -l LEVEL`` of ``dom`` into ``output``: through libvirt's backup API when
    it runs, with qemu-nbd when it is shut off."""
    tool("virtnbdbackup", output.parent, "-d", dom.name(), "-l", level, "-o", str(output))


def restored_equals(output: Path, disk: Path, folder: Path) -> bool:
    """Whether virtnbdrestore's image from ``output`` reads as ``disk`` (its whole chain)."""
    target = folder / "restored"
    shutil.rmtree(target, ignore_errors=True)
    tool("virtnbdrestore", folder, "-i", str(output), "-o", str(target))
    (image,) = target.glob("*.qcow2")
    # virtnbdrestore may return before its qemu-nbd has written the image out and let it go
    deadline = time.monotonic() + 30
    while held_for_writing(image):
        assert time.monotonic() < deadline, f"{image} still held after the restore"
        time.sleep(0.1)
    compared = subprocess.run(
        ["qemu-img", "compare", "-U", "-f", "qcow2", "-F", "qcow2", str(image), str(disk)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert compared.returncode in (0, 1), compared.stderr
    return compared.returncode == 0


def held_for_writing(image: Path) -> bool:
    """Whether a process holds ``image`` open for writing: asked of QEMU, which refuses to
    open it while a writer holds its lock (nobody else opens the restored image)."""
    info = subprocess.run(
        ["qemu-img", "info", "-f", "qcow2", str(image)], capture_output=True, check=False
    )
    return info.returncode != 0


def checked_backup(dom: Any, root: Path, config: Path) -> tuple[int, str]:
    """contrib/virtnbdbackup-checked of ``dom`` into backup root ``root``, asking the daemon
    of ``config``; returns what check answered and the level taken (full or inc)."""
    scratch = root.parent / "tool"
    scratch.mkdir(exist_ok=True)
    socket = scratch / f"wrapped-{uuid.uuid4().hex[:8]}.sock"
    result = subprocess.run(
        [str(WRAPPER), dom.name(), str(root), "-n", "-f", str(socket)],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "TMPDIR": str(scratch), "VIRT_BITMAPD_CONFIG": str(config)},
    )
    assert result.returncode == 0, f"the wrapper failed: {result.stdout}\n{result.stderr}"
    said = next(line for line in result.stdout.splitlines() if "check answered" in line)
    verdict = int(said.split("check answered ", 1)[1].split(":", 1)[0])
    return verdict, "inc" if "incremental backup into" in said else "full"


def current_set(root: Path) -> Path:
    """The backup set the wrapper takes incremental backups into."""
    return root / (root / "current").read_text().strip()
