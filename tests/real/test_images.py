"""Reading what images say about themselves, on real files made by qemu-img."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from helpers.images import create, run
from virt_bitmapd.images import recent_overlays

pytestmark = pytest.mark.real


def test_recent_overlays_name_their_backing_files(tmp_path: Path) -> None:
    base = create(tmp_path / "base.qcow2")
    old = create(tmp_path / "old-overlay.qcow2", backing=base)
    past = time.time() - 3600
    os.utime(old, (past, past))
    since = time.time() - 60
    relative = tmp_path / "relative.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(relative))
    on_relative = create(tmp_path / "on-relative.qcow2", backing=relative)
    create(tmp_path / "standalone.qcow2")
    create(tmp_path / "raw.img", fmt="raw")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "sub").mkdir()
    create(tmp_path / "sub" / "deeper.qcow2", backing=base)
    found = recent_overlays(
        [str(tmp_path)], newer_than=since, exclude={str(on_relative)}, storage_roots=[str(tmp_path)]
    )
    # old-overlay is older than the last look; standalone names no backing file
    assert found == {str(relative): str(base)}
    assert (
        recent_overlays(
            [str(tmp_path / "missing")], newer_than=0, exclude=set(), storage_roots=["/"]
        )
        == {}
    )
