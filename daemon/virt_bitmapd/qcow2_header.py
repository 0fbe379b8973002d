"""Read a qcow2 header, strictly, from bytes.  Pure: no I/O.

How this works: a file's first cluster is untrusted input (a raw disk's first bytes are its
guest's).  ``parse`` accepts only what QEMU itself would open as a plain qcow2 image, and says
why anything else is not one: a wrong magic or version, a cluster size out of range, an
incompatible feature it does not know, an external data file (which would make QEMU open a
second, header-named file), a backing name that is empty, too long, not UTF-8, holds a NUL byte
or names a protocol (``nbd+unix://``, ``json:{...}``), a header extension that runs past the
cluster.  Callers turn that into "not an overlay" or a named error; it never escapes as anything
but ``NotQcow2``.

Offsets and sizes follow QEMU's docs/interop/qcow2.txt.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

__all__ = [
    "MAX_HEADER_READ",
    "NotQcow2",
    "Qcow2Header",
    "has_protocol",
    "parse",
]

MAGIC = b"QFI\xfb"
# magic, version, backing_file_offset, backing_file_size, cluster_bits, size
_FIXED = struct.Struct(">4sIQIIQ")
_V3_TAIL = struct.Struct(">QQQI")  # incompatible, compatible, autoclear features, refcount_order
_V3_HEADER_LENGTH_AT = 100
V2_HEADER_LENGTH = 72
V3_MIN_HEADER_LENGTH = 104
MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21
#: Everything parse() may need lies in the first cluster, which is at most this long.
MAX_HEADER_READ = 1 << MAX_CLUSTER_BITS
MAX_BACKING_NAME = 1023  # QEMU's own limit

# Incompatible feature bits (qcow2.txt)
_DIRTY = 1 << 0
_CORRUPT = 1 << 1
_EXTERNAL_DATA_FILE = 1 << 2
_COMPRESSION_TYPE = 1 << 3
_EXTENDED_L2 = 1 << 4
_KNOWN_INCOMPATIBLE = _DIRTY | _CORRUPT | _EXTERNAL_DATA_FILE | _COMPRESSION_TYPE | _EXTENDED_L2

# Header extension types
_END = 0x00000000
_BACKING_FORMAT = 0xE2792ACA
_DATA_FILE = 0x44415441
_BITMAPS = 0x23852875
_EXTENSION = struct.Struct(">II")
_BITMAPS_EXTENSION = struct.Struct(">I4xQQ")  # nb_bitmaps, reserved, directory size, offset

_FORMAT_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")


class NotQcow2(ValueError):
    """The bytes are not a qcow2 image QEMU would open as one; the message says why."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Qcow2Header:
    version: int
    cluster_size: int
    virtual_size: int
    #: The backing file's name as recorded (a plain path, relative to the image's folder unless
    #: absolute), or None when the image has no backing file.
    backing_name: str | None
    #: The backing file's format as recorded in the header, or None when it is not recorded.
    backing_format: str | None
    corrupt: bool
    #: Bitmaps the header's extension announces (0 without the extension).
    bitmap_count: int


def has_protocol(name: str) -> bool:
    """Whether QEMU would read ``name`` as a protocol (``nbd:``, ``json:``, ``nbd+unix://``)
    rather than a file: a colon before the first slash, as QEMU's own path_has_protocol."""
    for char in name:
        if char == "/":
            return False
        if char == ":":
            return True
    return False


def parse(data: bytes) -> Qcow2Header:
    """The header at the start of ``data`` (the file's first bytes, as many as
    MAX_HEADER_READ or the whole file if shorter).  Raises NotQcow2."""
    if len(data) < _FIXED.size:
        raise NotQcow2("too short for a qcow2 header")
    magic, version, backing_offset, backing_size, cluster_bits, size = _FIXED.unpack_from(data)
    if magic != MAGIC:
        raise NotQcow2("no qcow2 magic")
    if version not in (2, 3):
        raise NotQcow2(f"qcow2 version {version} is not 2 or 3")
    if not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
        raise NotQcow2(f"cluster_bits {cluster_bits} out of range")
    cluster_size = 1 << cluster_bits
    incompatible = 0
    header_length = V2_HEADER_LENGTH
    if version == 3:
        if len(data) < V3_MIN_HEADER_LENGTH:
            raise NotQcow2("too short for a qcow2 version 3 header")
        incompatible = _V3_TAIL.unpack_from(data, V2_HEADER_LENGTH)[0]
        (header_length,) = struct.unpack_from(">I", data, _V3_HEADER_LENGTH_AT)
        if not V3_MIN_HEADER_LENGTH <= header_length <= cluster_size or header_length % 8:
            raise NotQcow2(f"header length {header_length} is not valid")
    if incompatible & ~_KNOWN_INCOMPATIBLE:
        raise NotQcow2(f"unknown incompatible features {incompatible:#x}")
    if incompatible & _EXTERNAL_DATA_FILE:
        raise NotQcow2("it keeps its data in an external data file, which is not supported")
    backing_name = _backing_name(data, backing_offset, backing_size, cluster_size)
    extensions_end = backing_offset if backing_name is not None else cluster_size
    backing_format, bitmap_count = _extensions(data, header_length, extensions_end)
    if backing_name is None:
        backing_format = None
    return Qcow2Header(
        version=version,
        cluster_size=cluster_size,
        virtual_size=size,
        backing_name=backing_name,
        backing_format=backing_format,
        corrupt=bool(incompatible & _CORRUPT),
        bitmap_count=bitmap_count,
    )


def _backing_name(data: bytes, offset: int, size: int, cluster_size: int) -> str | None:
    if offset == 0:
        return None
    if not 0 < size <= MAX_BACKING_NAME:
        raise NotQcow2(f"backing file name length {size} is not between 1 and 1023")
    if offset + size > min(cluster_size, len(data)):
        raise NotQcow2("backing file name lies past the first cluster or the end of the file")
    raw = data[offset : offset + size]
    if b"\0" in raw:
        raise NotQcow2("backing file name holds a NUL byte")
    try:
        name = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise NotQcow2("backing file name is not UTF-8") from error
    if has_protocol(name):
        raise NotQcow2(f"backing file {name!r} is not a plain file (a protocol or json: name)")
    return name


def _extensions(data: bytes, start: int, end: int) -> tuple[str | None, int]:
    """The backing format and bitmap count from the header extensions in data[start:end]."""
    end = min(end, len(data))
    offset = start
    backing_format: str | None = None
    bitmap_count = 0
    while offset + _EXTENSION.size <= end:
        kind, length = _EXTENSION.unpack_from(data, offset)
        offset += _EXTENSION.size
        if kind == _END:
            return backing_format, bitmap_count
        if offset + length > end:
            raise NotQcow2(f"header extension {kind:#x} runs past the header")
        body = data[offset : offset + length]
        if kind == _BACKING_FORMAT:
            text = body.decode("ascii", errors="replace")
            if not _FORMAT_NAME.fullmatch(text):
                raise NotQcow2(f"backing format {text!r} is not a format name")
            backing_format = text
        elif kind == _DATA_FILE:
            raise NotQcow2("it names an external data file, which is not supported")
        elif kind == _BITMAPS:
            if length < _BITMAPS_EXTENSION.size:
                raise NotQcow2("bitmaps header extension is too short")
            bitmap_count = _BITMAPS_EXTENSION.unpack_from(body)[0]
        offset += (length + 7) & ~7
    # QEMU stops at the end of the area too; an extension list without its end marker is
    # only accepted when it fills the area exactly.
    if offset < end:
        raise NotQcow2("header extensions are not terminated")
    return backing_format, bitmap_count
