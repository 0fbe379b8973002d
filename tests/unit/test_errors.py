"""What QEMU's tools say, turned into errors that name the image once."""

from __future__ import annotations

import pytest

from virt_bitmapd.errors import (
    ImageCorrupt,
    ImageError,
    ImageInUse,
    ImageMissing,
    ImageUnreadable,
)
from virt_bitmapd.qemu_messages import image_error_from_qemu


@pytest.mark.parametrize(
    ("message", "kind", "text"),
    [
        (
            "Could not open '/i/a': Could not open '/i/a': No such file or directory",
            ImageMissing,
            "/i/a: No such file or directory",
        ),
        (
            "Could not open backing file: Could not open '/i/b': Could not open '/i/b': "
            "No such file or directory",
            ImageMissing,
            "/i/a: Could not open backing file: Could not open '/i/b': No such file or directory",
        ),
        (
            'Failed to get shared "write" lock\nIs another process using the image [/i/a]?',
            ImageInUse,
            "/i/a: in use by another process (a running VM?): Failed to get shared",
        ),
        ("qcow2: Image is corrupt; cannot be opened read/write", ImageCorrupt, "/i/a: qcow2"),
        ("Permission denied", ImageUnreadable, "/i/a: Permission denied"),
    ],
)
def test_qemu_messages_are_classified_and_tidied(
    message: str, kind: type[ImageError], text: str
) -> None:
    error = image_error_from_qemu("/i/a", message)
    assert type(error) is kind
    assert error.image == "/i/a"
    assert str(error).startswith(text)
