"""`virt-bitmapd heal` on real qcow2 chains made with qemu-img and qemu-io, checked against the
data: a rebuilt copy marks every cluster its overlay allocates (data, zeroes and discards), and
nothing is changed when the superset argument does not hold."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers.images import (
    K64,
    MiB,
    add_bitmap,
    bitmap_names,
    create,
    dirty_extents,
    expected,
    leave_inconsistent,
    run,
    state,
    write,
)

pytestmark = pytest.mark.real

CLI = [sys.executable, "-m", "virt_bitmapd.cli"]


def heal(image: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, "heal", str(image), "--json", "--without-libvirt", *extra],
        capture_output=True,
        text=True,
        check=False,
    )


def chain(folder: Path, *, disabled: bool = False) -> tuple[Path, Path]:
    """base with cp1 and a write, then an overlay made by qemu-img (no bitmaps)."""
    base, overlay = folder / "base.qcow2", folder / "o.qcow2"
    create(base)
    add_bitmap(base, "cp1", disabled=disabled)
    write(base, 0, K64, 0x11)
    create(overlay, backing=base)
    return base, overlay


def io(path: Path, *commands: str) -> None:
    arguments = [part for command in commands for part in ("-c", command)]
    run("qemu-io", "-f", "qcow2", *arguments, str(path))


def test_a_rebuilt_copy_marks_every_cluster_the_overlay_allocates(tmp_path: Path) -> None:
    base, overlay = chain(tmp_path)
    io(overlay, f"write -q -P 7 {4 * MiB} 4096", f"write -q -z {8 * MiB} {K64}")
    io(overlay, f"discard -q {12 * MiB} {K64}", f"write -q -P 8 {20 * MiB - 512} 1024")
    result = heal(overlay, "--storage-root", str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads(result.stdout)["result"] == "healed"
    written = [(4 * MiB, 4096), (8 * MiB, K64), (12 * MiB, K64), (20 * MiB - 512, 1024)]
    assert dirty_extents(overlay, "cp1") == expected(written)
    assert dirty_extents(base, "cp1") == expected([(0, K64)])  # the base is untouched
    again = heal(overlay)
    assert again.returncode == 0 and json.loads(again.stdout)["result"] == "nothing to do"


def test_a_gap_between_copies_is_filled(tmp_path: Path) -> None:
    _, middle = chain(tmp_path)
    write(middle, 2 * MiB, K64, 0x22)
    top = create(tmp_path / "top.qcow2", backing=middle)
    add_bitmap(top, "cp1")
    result = heal(top)
    assert result.returncode == 0, result.stdout
    assert dirty_extents(middle, "cp1") == expected([(2 * MiB, K64)])
    assert "cp1" in bitmap_names(top)


def test_a_dry_run_changes_nothing(tmp_path: Path) -> None:
    _, overlay = chain(tmp_path)
    write(overlay, MiB, K64)
    before = state(overlay)
    result = heal(overlay, "--dry-run")
    assert result.returncode == 0 and json.loads(result.stdout)["result"] == "planned"
    assert state(overlay) == before


@pytest.mark.parametrize("damage", ["disabled", "inconsistent"])
def test_a_lowest_copy_that_did_not_record_is_refused(tmp_path: Path, damage: str) -> None:
    base, overlay = chain(tmp_path, disabled=damage == "disabled")
    if damage == "inconsistent":
        leave_inconsistent(base, "cp1")
    write(overlay, MiB, K64)
    before = state(overlay), state(base)
    result = heal(overlay)
    assert result.returncode == 1
    (refusal,) = json.loads(result.stdout)["refused"]
    assert refusal["bitmap"] == "cp1" and damage in refusal["reason"]
    assert refusal["layer"] == str(base)
    assert (state(overlay), state(base)) == before


def test_an_image_outside_the_storage_roots_is_refused(tmp_path: Path) -> None:
    _, overlay = chain(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = heal(overlay, "--storage-root", str(elsewhere))
    assert result.returncode == 1 and "outside" in result.stderr
    assert "cp1" not in bitmap_names(overlay)


def locked(path: Path) -> bool:
    """Whether some process holds a lock on ``path`` (QEMU's are OFD locks, listed in
    /proc/locks by device and inode). Read there, not by opening the image: a probe that opens
    it could make the holder's own lock fail."""
    st = path.stat()
    device = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    return any(device in line.split() for line in Path("/proc/locks").read_text().splitlines())


def test_an_image_in_use_is_refused(tmp_path: Path) -> None:
    _, overlay = chain(tmp_path)
    holder = subprocess.Popen(
        ["qemu-io", "-f", "qcow2", "-c", "sleep 60000", str(overlay)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 30
        while not locked(overlay):
            assert holder.poll() is None, holder.communicate()[1]
            assert time.monotonic() < deadline, "qemu-io never took the image's lock"
            time.sleep(0.05)
        result = heal(overlay)
    finally:
        holder.kill()
        holder.wait()
    assert result.returncode == 1 and "in use" in result.stderr, result.stderr
    assert "cp1" not in bitmap_names(overlay)


def test_an_image_no_domain_uses_is_refused_unless_vouched_for(tmp_path: Path) -> None:
    """Without a libvirt domain's checkpoints nothing shows where each bitmap was taken: the
    person running the command must say the lowest copies are so (--without-libvirt)."""
    _, overlay = chain(tmp_path)
    result = subprocess.run(
        [*CLI, "heal", str(overlay), "--dry-run"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 1, result.stdout
    assert str(overlay) in result.stderr and "--without-libvirt" in result.stderr
    assert heal(overlay, "--dry-run").returncode == 0
