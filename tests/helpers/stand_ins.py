"""QEMU tools replaced on PATH by stand-ins that misbehave on cue (``crashing_tool.py``)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

HELPERS = Path(__file__).resolve().parent


def crashing_path(folder: Path, at: str, signal_name: str) -> dict[str, str]:
    """An environment whose qemu-storage-daemon crashes at ``at``; one holding (``hold:CMD``)
    creates ``holding_mark(folder)`` once it holds."""
    bin_dir = folder / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "qemu-storage-daemon").symlink_to(HELPERS / "crashing_tool.py")
    real = shutil.which("qemu-storage-daemon")
    assert real is not None
    return {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "VBD_REAL_TOOL": real,
        "VBD_CRASH_AT": at,
        "VBD_CRASH_SIGNAL": signal_name,
        "VBD_HOLDING_MARK": str(holding_mark(folder)),
    }


def holding_mark(folder: Path) -> Path:
    """The file a holding stand-in creates: everything before the command it holds is done."""
    return folder / "bin" / "holding"
