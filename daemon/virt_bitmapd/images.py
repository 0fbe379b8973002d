"""Read images at rest: qcow2 headers, bitmaps, backing chains.  Never lets QEMU guess.

How this works: a raw disk's bytes are its guest's, so nothing here ever asks QEMU to probe a
format or to follow a backing name.  A chain is walked one layer at a time:

* every layer is opened with an explicit format: the top's is given (libvirt's ``<driver
  type>``, or qcow2 for a person naming an image), a lower one's comes from libvirt's XML where it
  describes that layer, else from the backing format recorded in the header above it; a backing
  whose format is recorded nowhere is refused, as libvirt refuses it;
* a qcow2 layer's header is read here first (``qcow2_header.parse``: a plain file name, no
  protocol, no external data file), then ``qemu-img info -f qcow2`` reads its bitmaps without
  opening its backing file, and both must agree on the backing name;
* a layer of another format (a raw base) ends the chain and is never opened at all.

Without ``force_share``, qemu-img takes QEMU's image locks, so an image another process holds
open (a running VM, a writer) is refused as ImageInUse: exactly what must be known before
changing anything.  With it, the image is read anyway; the in-use flags QEMU leaves on the bitmaps
of an open image then say nothing about their consistency.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence, Set
from typing import Any

from . import qcow2_header
from .errors import (
    ChainError,
    ImageCorrupt,
    ImageMissing,
    ImageUnreadable,
    ToolCrashed,
    ToolFailed,
)
from .model import QCOW2, Bitmap, Chain, Image
from .qcow2_header import NotQcow2, Qcow2Header
from .qemu_messages import describe_exit, image_error_from_qemu
from .storage_roots import is_inside

__all__ = ["backing_path", "read_chain", "read_header", "read_image", "recent_overlays"]

TOOL = "qemu-img"
RAW = "raw"
#: Formats a chain may end with; their layers are never opened.
LEAF_FORMATS = (RAW,)
FIRST_READ = 4096
MAX_CHAIN_LENGTH = 256


def read_header(path: str) -> Qcow2Header:
    """The qcow2 header of the regular file ``path``.  Raises ImageMissing, ImageUnreadable,
    or ImageCorrupt (saying why it is no qcow2 image QEMU would open as one)."""
    try:
        # O_NONBLOCK: a FIFO planted under the name must not hang the reader
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except FileNotFoundError as error:
        raise ImageMissing(path, "No such file or directory") from error
    except OSError as error:
        raise ImageUnreadable(path, f"cannot be opened: {error.strerror}") from error
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ImageUnreadable(path, "not a regular file")
        data = os.pread(fd, FIRST_READ, 0)
        cluster_bits = int.from_bytes(data[20:24], "big") if len(data) >= 24 else 0
        if data[:4] == qcow2_header.MAGIC and 1 << cluster_bits > FIRST_READ:
            wanted = min(1 << cluster_bits, qcow2_header.MAX_HEADER_READ)
            data += os.pread(fd, wanted - len(data), len(data))
    except OSError as error:
        raise ImageUnreadable(path, f"cannot be read: {error.strerror}") from error
    finally:
        os.close(fd)
    try:
        return qcow2_header.parse(data)
    except NotQcow2 as error:
        raise ImageCorrupt(path, f"not a qcow2 image QEMU may open: {error}") from error


def backing_path(image: str, name: str) -> str:
    """Where backing name ``name``, recorded in ``image``, points: relative names are relative
    to the image's folder (as QEMU reads them), symlinks resolved."""
    return os.path.realpath(os.path.join(os.path.dirname(image), name))


def read_image(
    path: str, *, force_share: bool = False, binary: str = TOOL, timeout: float = 60.0
) -> Image:
    """One qcow2 image by itself (its backing file is neither opened nor needed)."""
    return _read_qcow2(os.path.realpath(path), force_share, binary, timeout)[0]


def read_chain(
    top: str,
    *,
    formats: Mapping[str, str] | None = None,
    force_share: bool = False,
    binary: str = TOOL,
    timeout: float = 60.0,
) -> Chain:
    """The backing chain that starts at the qcow2 image ``top``, top first, every path absolute
    and real.  ``formats``: what libvirt says of layers it describes (real path -> format),
    which wins over a header's record."""
    known = formats or {}
    layers: list[Image] = []
    path, image_format = os.path.realpath(top), QCOW2
    while True:
        if any(layer.path == path for layer in layers):
            raise ChainError(
                f"{path}: backing loop: the chain from {layers[0].path} comes back here"
            )
        if len(layers) >= MAX_CHAIN_LENGTH:
            raise ChainError(f"{top}: the backing chain is longer than {MAX_CHAIN_LENGTH} layers")
        if image_format in LEAF_FORMATS:
            layers.append(_leaf(path, image_format))
            break
        if image_format != QCOW2:
            raise ChainError(f"{path}: format {image_format!r} is not supported (qcow2 or raw)")
        image, header = _read_qcow2(path, force_share, binary, timeout)
        layers.append(image)
        if header.backing_name is None:
            break
        below = backing_path(path, header.backing_name)
        recorded = known.get(below) or header.backing_format
        if recorded is None:
            raise ChainError(
                f"{path}: the format of its backing file {below} is not recorded in its header; "
                "refusing to guess it (record it: qemu-img rebase -u -b BACKING -F FORMAT)"
            )
        path, image_format = below, recorded
    return Chain(tuple(layers))


def recent_overlays(
    directories: Iterable[str],
    *,
    newer_than: float,
    exclude: Set[str],
    storage_roots: Sequence[str],
    not_overlays: Callable[[], Collection[str]] = tuple,
) -> dict[str, str]:
    """Regular files directly in ``directories`` and under ``storage_roots``, modified after
    ``newer_than`` (a time.time()), other than ``exclude`` and ``not_overlays()`` (disks a
    domain uses as raw: their header is their guest's), whose qcow2 header names a plain backing
    file with the format qcow2 recorded: each with that backing file (absolute, symlinks
    resolved).  ``not_overlays`` is asked once, before the first header is read, and only if
    some file is recent enough (asking libvirt costs a call per domain of the host).

    Only the headers are read (no process per file).  A file that is not such an overlay, or
    cannot be read, is left out: it is evidence of nothing."""
    skip: set[str] | None = None
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
                if path in exclude or not is_inside(path, storage_roots):
                    continue
                if skip is None:
                    skip = {os.path.realpath(raw) for raw in not_overlays()}
                if path in skip:
                    continue
                header = read_header(path)
            except (OSError, ImageCorrupt, ImageMissing, ImageUnreadable):
                continue
            if header.backing_name is not None and header.backing_format == QCOW2:
                found[path] = backing_path(path, header.backing_name)
    return found


def _leaf(path: str, image_format: str) -> Image:
    """A layer of a format without bitmaps or backing file: checked to exist, never opened."""
    try:
        size = os.stat(path).st_size
    except FileNotFoundError as error:
        raise ImageMissing(path, "No such file or directory") from error
    except OSError as error:
        raise ImageUnreadable(path, f"cannot be read: {error.strerror}") from error
    return Image(path=path, format=image_format, virtual_size=size)


def _read_qcow2(
    path: str, force_share: bool, binary: str, timeout: float
) -> tuple[Image, Qcow2Header]:
    header = read_header(path)
    if header.corrupt:
        raise ImageCorrupt(path, "qcow2 header is marked corrupt; run 'qemu-img check -r'")
    info = _info(path, force_share, binary, timeout)
    if info.get("format") != QCOW2 or info.get("backing-filename") != header.backing_name:
        raise ImageCorrupt(path, "QEMU reads its header differently; not touched")
    return _parse_image(path, info), header


def _info(path: str, force_share: bool, binary: str, timeout: float) -> dict[str, Any]:
    # -f qcow2: never a probe.  Without --backing-chain, qemu-img opens no backing file.
    command = [binary, "info", "-f", QCOW2, "--output=json"]
    if force_share:
        command.append("-U")
    command += ["--", path]
    try:
        # a read that ends by itself in milliseconds: run plainly (see transports.children)
        result = subprocess.run(command, capture_output=True, timeout=timeout, check=False)
    except OSError as error:
        raise ToolFailed(f"cannot run {binary}: {error}", retryable=False) from error
    except subprocess.TimeoutExpired as error:
        raise ToolFailed(f"{binary} info {path} did not finish within {timeout:.0f} s") from error
    if result.returncode != 0:
        message = result.stderr.decode(errors="replace").strip()
        if result.returncode < 0:  # a crash says nothing about the image
            said = f": {message[-2000:]}" if message else ""
            raise ToolCrashed(f"{binary} info {path} {describe_exit(result.returncode)}{said}")
        raise image_error_from_qemu(path, message.removeprefix(f"{binary}: ").replace("\n", " "))
    try:
        info = json.loads(result.stdout)
    except json.JSONDecodeError as error:
        raise ToolFailed(f"{binary} info {path} printed no JSON: {error}") from error
    if not isinstance(info, dict):
        raise ToolFailed(f"{binary} info {path} printed no JSON object")
    return info


def _parse_image(path: str, entry: Mapping[str, Any]) -> Image:
    specific = entry.get("format-specific", {})
    data = specific.get("data", {}) if specific.get("type") == QCOW2 else {}
    if data.get("corrupt"):
        raise ImageCorrupt(path, "qcow2 header is marked corrupt; run 'qemu-img check -r'")
    try:
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
            format=QCOW2,
            virtual_size=int(entry.get("virtual-size", 0)),
            bitmaps=bitmaps,
        )
    except (KeyError, TypeError, ValueError) as error:
        raise ImageCorrupt(path, f"its bitmaps cannot be read: {error}") from error
