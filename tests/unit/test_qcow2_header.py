"""The qcow2 header reader on hand-made headers, and fuzzed: it says "not qcow2" or reads a
header, and never fails any other way."""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from virt_bitmapd.qcow2_header import NotQcow2, has_protocol, parse

CLUSTER_BITS = 16
HEADER_LENGTH = 112


def header(
    *,
    backing: bytes | None = None,
    backing_format: bytes | None = b"qcow2",
    version: int = 3,
    cluster_bits: int = CLUSTER_BITS,
    incompatible: int = 0,
    backing_offset: int | None = None,
    backing_size: int | None = None,
    extensions: bytes | None = None,
    bitmaps: int = 0,
    length: int = 1 << CLUSTER_BITS,
) -> bytes:
    """A qcow2 version 3 header laid out as qemu-img lays it out: header, extensions, end
    marker, then the backing name, in a first cluster of ``length`` bytes."""
    if extensions is None:
        extensions = b""
        if backing is not None and backing_format is not None:
            padded = backing_format + b"\0" * (-len(backing_format) % 8)
            extensions += struct.pack(">II", 0xE2792ACA, len(backing_format)) + padded
        if bitmaps:
            extensions += struct.pack(">II", 0x23852875, 24) + struct.pack(">I4xQQ", bitmaps, 0, 0)
        extensions += struct.pack(">II", 0, 0)
    name_at = HEADER_LENGTH + len(extensions)
    fixed = struct.pack(
        ">4sIQIIQ",
        b"QFI\xfb",
        version,
        0 if backing is None else (backing_offset if backing_offset is not None else name_at),
        0 if backing is None else (backing_size if backing_size is not None else len(backing)),
        cluster_bits,
        64 << 20,
    )
    fixed += b"\0" * (72 - len(fixed))
    fixed += struct.pack(">QQQII", incompatible, 0, 0, 4, HEADER_LENGTH)
    fixed += b"\0" * (HEADER_LENGTH - len(fixed))
    data = fixed + extensions + (backing or b"")
    return (data + b"\0" * length)[:length]


def test_an_overlay_names_its_backing_file_and_format() -> None:
    parsed = parse(header(backing=b"base.qcow2", bitmaps=3))
    assert parsed.backing_name == "base.qcow2" and parsed.backing_format == "qcow2"
    assert parsed.cluster_size == 65536 and parsed.virtual_size == 64 << 20
    assert parsed.bitmap_count == 3 and not parsed.corrupt


def test_an_image_without_backing_file() -> None:
    parsed = parse(header())
    assert parsed.backing_name is None and parsed.backing_format is None


def test_a_backing_format_not_recorded_reads_as_none() -> None:
    assert parse(header(backing=b"/images/base", backing_format=None)).backing_format is None


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"", "too short"),
        (b"\0" * 512, "no qcow2 magic"),
        (header()[:50], "too short"),
        (header(version=1), "version 1"),
        (header(version=4), "version 4"),
        (header(cluster_bits=8), "cluster_bits 8"),
        (header(cluster_bits=22), "cluster_bits 22"),
        (header(incompatible=1 << 9), "unknown incompatible features"),
        (header(incompatible=1 << 2), "external data file"),
        (header(backing=b"nbd+unix:///x?socket=/run/s.sock"), "not a plain file"),
        (header(backing=b'json:{"driver":"nbd"}'), "not a plain file"),
        (header(backing=b"nbd:unix:/run/s.sock"), "not a plain file"),
        (header(backing=b"base\0.qcow2"), "NUL byte"),
        (header(backing=b"\xff\xfe.qcow2"), "not UTF-8"),
        (header(backing=b"a" * 1024), "length 1024"),
        (header(backing=b"base.qcow2", backing_size=0), "length 0"),
        (header(backing=b"base.qcow2", backing_offset=(1 << 16) - 4), "past the first cluster"),
        (header(backing=b"base.qcow2", length=140), "past the first cluster"),
        (header(backing=b"base.qcow2", backing_format=b"QCOW2!"), "not a format name"),
        (header(extensions=struct.pack(">II", 0x44415441, 8) + b"/dev/sda"), "external data"),
        (header(extensions=struct.pack(">II", 0x12345678, 1 << 20)), "runs past the header"),
    ],
)
def test_what_is_not_a_plain_qcow2_image_is_refused_with_the_reason(data: bytes, why: str) -> None:
    with pytest.raises(NotQcow2, match=why):
        parse(data)


def test_a_corrupt_flag_is_read() -> None:
    assert parse(header(incompatible=1 << 1)).corrupt


@pytest.mark.parametrize(
    ("name", "protocol"),
    [
        ("base.qcow2", False),
        ("/images/a:b.qcow2", False),
        ("../images/base.qcow2", False),
        ("sub/dir:x", False),
        ("nbd:unix:/s", True),
        ("json:{}", True),
        ("file:base.qcow2", True),
        ("a:b", True),
    ],
)
def test_protocols_are_told_apart_as_qemu_tells_them(name: str, protocol: bool) -> None:
    assert has_protocol(name) is protocol


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=4096))
def test_random_bytes_are_never_anything_but_not_qcow2(data: bytes) -> None:
    with contextlib.suppress(NotQcow2):
        parse(data)


@settings(max_examples=600, deadline=None)
@given(
    position=st.integers(min_value=0, max_value=400),
    replacement=st.binary(min_size=1, max_size=16),
    backing=st.binary(min_size=1, max_size=40),
)
def test_mutated_headers_are_read_or_refused_never_crash(
    position: int, replacement: bytes, backing: bytes
) -> None:
    data = bytearray(header(backing=backing, length=1024))
    data[position : position + len(replacement)] = replacement
    try:
        parsed = parse(bytes(data))
    except NotQcow2:
        return
    if parsed.backing_name is not None:  # whatever was read is a plain name QEMU opens as a file
        assert "\0" not in parsed.backing_name and not has_protocol(parsed.backing_name)
        assert 0 < len(parsed.backing_name.encode()) <= 1023
