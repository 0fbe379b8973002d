"""Build real qcow2 chains with QEMU's tools, and read a bitmap's dirty extents back over NBD.

The extents are the test oracle: what a bitmap really holds, read by QEMU's NBD server, compared
with the blocks the test wrote.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

MiB = 1 << 20
K64 = 65536


def run(*command: str) -> str:
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise AssertionError(f"{command} failed ({result.returncode}): {result.stderr}")
    return result.stdout


def create(
    path: Path, *, size: str = "64M", backing: Path | None = None, fmt: str = "qcow2"
) -> Path:
    command = ["qemu-img", "create", "-q", "-f", fmt]
    if backing is not None:
        command += ["-b", str(backing), "-F", image_format(backing)]
    run(*command, str(path), *([] if backing is not None else [size]))
    return path


def image_format(path: Path) -> str:
    return str(json.loads(run("qemu-img", "info", "--output=json", "-U", str(path)))["format"])


def add_bitmap(
    path: Path, name: str, *, granularity: int | None = None, disabled: bool = False
) -> None:
    command = ["qemu-img", "bitmap", "--add"]
    if granularity is not None:
        command += ["-g", str(granularity)]
    if disabled:
        command.append("--disable")
    run(*command, str(path), name)


def write(path: Path, offset: int, length: int, pattern: int = 0xAA) -> None:
    """Write through QEMU's block layer, so the image's recording bitmaps record it."""
    run("qemu-io", "-f", "qcow2", "-c", f"write -q -P {pattern} {offset} {length}", str(path))


def bitmaps(path: Path) -> list[dict[str, object]]:
    info = json.loads(run("qemu-img", "info", "--output=json", "-U", str(path)))
    data = info.get("format-specific", {}).get("data", {})
    return list(data.get("bitmaps", []))


def bitmap_names(path: Path) -> set[str]:
    return {str(b["name"]) for b in bitmaps(path)}


def leave_inconsistent(path: Path, name: str) -> None:
    """Make bitmap ``name`` inconsistent the way a crash does: kill a writer that has it loaded."""
    assert name in bitmap_names(path)
    writer = subprocess.Popen(
        ["qemu-io", "-f", "qcow2", "-c", "sleep 60000", str(path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while not any("in-use" in b["flags"] for b in bitmaps(path)):  # type: ignore[operator]
        assert time.monotonic() < deadline, "qemu-io never opened the image"
        time.sleep(0.05)
    # the flag is set while QEMU still opens the image, which may write its header again:
    # killed in the middle of that, the bitmap directory can be lost instead
    time.sleep(0.5)
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    # what the crash left is checked, not assumed: the test after it depends on it
    left = {str(b["name"]): b["flags"] for b in bitmaps(path)}
    assert "in-use" in left.get(name, []), f"{path}: the crash left {left}"  # type: ignore[operator]


def corrupt(path: Path) -> None:
    """Point the qcow2 refcount table far outside the file: QEMU refuses the image as corrupt."""
    with path.open("r+b") as header:
        header.seek(48)  # refcount_table_offset
        header.write((0xFFFFFFFFFF00).to_bytes(8, "big"))


class ExportRefused(AssertionError):
    """qemu-nbd would not export the bitmap; the message is its own."""


def dirty_extents(path: Path, name: str) -> list[tuple[int, int]]:
    """The (offset, length) runs bitmap ``name`` of ``path`` marks dirty, merged and sorted:
    what an offline backup tool copies (``qemu-nbd --bitmap``, the top-most copy of the
    bitmap in the chain).  Raises ExportRefused with qemu-nbd's words when it refuses."""
    with tempfile.TemporaryDirectory() as folder:
        sock = os.path.join(folder, "nbd.sock")
        server = subprocess.Popen(
            ["qemu-nbd", "-r", "-t", "-k", sock, "-f", "qcow2", "-B", name, str(path)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            deadline = time.monotonic() + 10
            while not os.path.exists(sock):
                if server.poll() is not None:
                    raise ExportRefused(f"qemu-nbd failed: {server.stderr.read()!r}")  # type: ignore[union-attr]
                assert time.monotonic() < deadline, "qemu-nbd did not start"
                time.sleep(0.02)
            escaped = name.replace(",", ",,")
            options = (
                f"driver=nbd,server.type=unix,server.path={sock},"
                f"x-dirty-bitmap=qemu:dirty-bitmap:{escaped}"
            )
            try:
                mapped = run("qemu-img", "map", "--output=json", "--image-opts", options)
            except AssertionError:
                # the socket may be bound before the bitmap is checked: did qemu-nbd give up?
                if server.wait(timeout=10) != 0:
                    raise ExportRefused(f"qemu-nbd failed: {server.stderr.read()!r}") from None  # type: ignore[union-attr]
                raise
            extents = json.loads(mapped)
        finally:
            server.terminate()
            server.wait()
    # qemu-img map reports dirty extents as "data": false (the sense is inverted).
    return merge_runs((e["start"], e["length"]) for e in extents if not e["data"])


def merge_runs(runs: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for start, length in sorted(runs):
        if merged and merged[-1][0] + merged[-1][1] >= start:
            last_start, last_length = merged[-1]
            merged[-1] = (last_start, max(last_start + last_length, start + length) - last_start)
        else:
            merged.append((start, length))
    return merged


def expected(writes: Iterable[tuple[int, int]], granularity: int = K64) -> list[tuple[int, int]]:
    """The runs a bitmap of ``granularity`` marks for these (offset, length) writes."""
    rounded = []
    for offset, length in writes:
        start = offset - offset % granularity
        end = -(-(offset + length) // granularity) * granularity
        rounded.append((start, end - start))
    return merge_runs(rounded)


def state(path: Path) -> dict[str, object]:
    """Everything about an image's bitmaps that a reconciliation could change."""
    result: dict[str, object] = {}
    for b in bitmaps(path):
        flags = b["flags"]
        extents = None if "in-use" in flags else dirty_extents(path, str(b["name"]))  # type: ignore[operator]
        result[str(b["name"])] = (b["granularity"], sorted(flags), extents)  # type: ignore[call-overload]
    return result


def virtual_size(path: Path) -> int:
    return int(
        json.loads(run("qemu-img", "info", "--output=json", "-U", str(path)))["virtual-size"]
    )


def filled(before: dict[str, object], names: list[str], size: int) -> dict[str, object]:
    """An image's ``state`` with bitmaps ``names`` recording and marking every byte of a disk
    of ``size`` bytes, and nothing else changed."""
    result: dict[str, object] = {}
    for name, entry in before.items():
        assert isinstance(entry, tuple)
        result[name] = (entry[0], ["auto"], [(0, size)]) if name in names else entry
    return result


@dataclass
class ChainBuilder:
    """A chain under construction that remembers what each checkpoint should have recorded."""

    folder: Path
    layers: list[Path] = field(default_factory=list)
    recorded: dict[str, list[tuple[int, int]]] = field(default_factory=dict)

    def start(self, name: str = "base.qcow2", size: str = "64M") -> Path:
        self.layers.append(create(self.folder / name, size=size))
        return self.layers[-1]

    @property
    def active(self) -> Path:
        return self.layers[-1]

    def checkpoint(self, name: str, granularity: int | None = None) -> None:
        add_bitmap(self.active, name, granularity=granularity)
        self.recorded[name] = []

    def write(self, offset: int, length: int, pattern: int = 0xAA) -> None:
        write(self.active, offset, length, pattern)
        for b in bitmaps(self.active):
            if "auto" in b["flags"]:  # type: ignore[operator]
                self.recorded[str(b["name"])].append((offset, length))

    def snapshot(self, name: str) -> Path:
        """An external snapshot as libvirt makes one: recording bitmaps continue in the overlay."""
        old = self.active
        self.layers.append(create(self.folder / name, backing=old))
        for b in bitmaps(old):
            if "auto" in b["flags"]:  # type: ignore[operator]
                add_bitmap(self.active, str(b["name"]), granularity=int(b["granularity"]))  # type: ignore[call-overload]
        return self.active
