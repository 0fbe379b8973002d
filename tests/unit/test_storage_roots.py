"""Storage roots: what lies inside, with symlinks and '..' resolved; what cannot be a root."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from virt_bitmapd.storage_roots import is_inside, root_problem


def test_symlinked_folders_and_dotdot_do_not_lead_out(tmp_path: Path) -> None:
    root = tmp_path / "root"
    outside = tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "link").symlink_to(outside)
    assert is_inside(str(root / "a.qcow2"), [str(root)])
    assert not is_inside(str(root / "link" / "a.qcow2"), [str(root)])
    assert not is_inside(str(root / ".." / "outside" / "a.qcow2"), [str(root)])
    assert not is_inside(str(tmp_path / "rootless.qcow2"), [str(root)])  # a prefix is not a root
    assert not is_inside(str(root / "a.qcow2"), [])


def test_a_root_that_is_the_whole_file_system_is_never_inside(tmp_path: Path) -> None:
    (tmp_path / "to-slash").symlink_to("/")
    assert not is_inside("/etc/passwd", ["/"])
    assert not is_inside("/etc/passwd", [str(tmp_path / "to-slash")])


@pytest.mark.parametrize("root", ["/", "//", "///", "/..", "/./", "/var/.."])
def test_the_whole_file_system_is_no_storage_root(root: str) -> None:
    assert "whole file system" in str(root_problem(root))


def test_a_symlink_to_slash_is_no_storage_root(tmp_path: Path) -> None:
    link = tmp_path / "slash"
    link.symlink_to("/")
    assert "whole file system" in str(root_problem(str(link)))
    assert root_problem(str(tmp_path)) is None
    assert "not an absolute path" in str(root_problem("images"))
    assert os.path.isabs(str(tmp_path))
