"""Read backing chains of images at rest with ``qemu-img info --backing-chain``.

Without ``force_share``, qemu-img takes QEMU's image locks, so an image another process holds
open (a running VM, a writer) is refused as ImageInUse: exactly what must be known before
changing anything.  With it, the chain is read anyway; the in-use flags QEMU leaves on the bitmaps
of an open image then say nothing about their consistency.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
from collections.abc import Iterable, Set
from typing import Any

from .errors import ImageCorrupt, ImageUnreadable, ToolFailed, image_error_from_qemu
from .model import Bitmap, Chain, Image

__all__ = ["parse_chain", "read_chain", "read_image", "recent_overlays"]

QCOW2_MAGIC = b"QFI\xfb"
# magic, version, backing_file_offset, backing_file_size (big endian, at the start of the header)
QCOW2_HEADER = struct.Struct(">4sIQI")
MAX_BACKING_NAME = 1023  # QEMU's own limit

TOOL = "qemu-img"


def read_chain(
    path: str, *, force_share: bool = False, binary: str = TOOL, timeout: float = 60.0
) -> Chain:
    """The backing chain that starts at ``path``, top first, every path absolute and real."""
    entries = _info(path, ["--backing-chain"], force_share, binary, timeout)
    return parse_chain(entries)


def read_image(
    path: str, *, force_share: bool = False, binary: str = TOOL, timeout: float = 60.0
) -> Image:
    """One image by itself (its backing file is neither opened nor needed)."""
    return _parse_image(_info(path, [], force_share, binary, timeout))


def recent_overlays(
    directories: Iterable[str], *, newer_than: float, exclude: Set[str]
) -> dict[str, str]:
    """qcow2 files directly in ``directories``, modified after ``newer_than`` (a time.time()),
    other than ``exclude``, each with the backing file it names (absolute, symlinks resolved).

    Only the first bytes of each header are read (qcow2's backing_file_offset and _size), so
    scanning a busy directory costs no process per file.  Unreadable files are left out: they
    are evidence of nothing."""
    found = {}
    for directory in set(directories):
        try:
            entries = list(os.scandir(directory))
        except OSError:
            continue
        for entry in entries:
            try:
                if not entry.is_file() or entry.stat().st_mtime <= newer_than:
                    continue
                path = os.path.realpath(entry.path)
                if path in exclude:
                    continue
                backing = _qcow2_backing_name(path)
            except OSError:
                continue
            if backing and not backing.startswith("json:"):
                found[path] = os.path.realpath(os.path.join(os.path.dirname(path), backing))
    return found


def _qcow2_backing_name(path: str) -> str | None:
    with open(path, "rb") as stream:
        header = stream.read(QCOW2_HEADER.size)
        if len(header) < QCOW2_HEADER.size:
            return None
        magic, _version, offset, size = QCOW2_HEADER.unpack(header)
        if magic != QCOW2_MAGIC or not offset or not 0 < size <= MAX_BACKING_NAME:
            return None
        stream.seek(offset)
        return stream.read(size).decode("utf-8", errors="replace")


def _info(path: str, options: list[str], force_share: bool, binary: str, timeout: float) -> Any:
    real = os.path.realpath(path)
    command = [binary, "info", *options, "--output=json"]
    if force_share:
        command.append("-U")
    command += ["--", real]
    try:
        result = subprocess.run(command, capture_output=True, timeout=timeout, check=False)
    except OSError as error:
        raise ToolFailed(f"cannot run {binary}: {error}") from error
    except subprocess.TimeoutExpired as error:
        raise ToolFailed(f"{binary} info {real} did not finish within {timeout:.0f} s") from error
    if result.returncode != 0:
        message = result.stderr.decode(errors="replace").strip()
        raise image_error_from_qemu(_failed_image(message, real), _without_prefix(message))
    try:
        return json.loads(result.stdout)
    except json.JSONDecodeError as error:
        raise ToolFailed(f"{binary} info {real} printed no JSON: {error}") from error


def parse_chain(entries: list[dict[str, Any]]) -> Chain:
    """Build a Chain from the JSON list ``qemu-img info --backing-chain`` prints."""
    return Chain(tuple(_parse_image(entry) for entry in entries))


def _parse_image(entry: dict[str, Any]) -> Image:
    filename = str(entry["filename"])
    if filename.startswith("json:"):
        raise ImageUnreadable(filename, "not a plain file (a json: pseudo-filename)")
    path = os.path.realpath(filename)
    specific = entry.get("format-specific", {})
    data = specific.get("data", {}) if specific.get("type") == "qcow2" else {}
    if data.get("corrupt"):
        raise ImageCorrupt(path, "qcow2 header is marked corrupt; run 'qemu-img check -r'")
    bitmaps = tuple(
        Bitmap(
            name=str(raw["name"]),
            granularity=int(raw["granularity"]),
            recording="auto" in raw.get("flags", []),
            inconsistent="in-use" in raw.get("flags", []),
        )
        for raw in data.get("bitmaps", [])
    )
    return Image(
        path=path,
        format=str(entry["format"]),
        virtual_size=int(entry.get("virtual-size", 0)),
        bitmaps=bitmaps,
    )


def _failed_image(message: str, default: str) -> str:
    """The innermost image qemu-img names in "Could not open 'X': ..." (a missing backing
    file is named in the inner part)."""
    marker = "Could not open '"
    start = message.rfind(marker)
    if start < 0:
        return default
    start += len(marker)
    end = message.find("'", start)
    return message[start:end] if end > start else default


def _without_prefix(message: str) -> str:
    return message.removeprefix("qemu-img: ").replace("\n", " ")
