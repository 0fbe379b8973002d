"""What QEMU's tools say, in this program's words: how a tool ended, and which error an
image's failure to open is, by patterns checked against QEMU's own messages
(tests/real/test_qemu_messages.py produces each of them and checks the kind)."""

from __future__ import annotations

import re
import signal

from .errors import ImageCorrupt, ImageError, ImageInUse, ImageMissing, ImageUnreadable

__all__ = ["describe_exit", "image_error_from_qemu"]


def describe_exit(code: int | None) -> str:
    """A process's end in words: its exit status, or the signal that ended it."""
    if code is None:
        return "did not end"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


def _tidy_qemu_message(image: str, message: str) -> str:
    """QEMU repeats "Could not open 'X': " once per block layer; once is enough, and not at all
    when X is the image the error names already."""
    message = re.sub(r"(Could not open '[^']*': )\1+", r"\1", message.strip())
    own = f"Could not open '{image}': "
    return message[len(own) :] if message.startswith(own) else message


# What QEMU says, as seen from qemu-img 7.2 and qemu-storage-daemon.
_IN_USE = re.compile(r"Failed to get \S+ \"?\w+\"? lock|Is another process using the image")
_MISSING = re.compile(r"No such file or directory")
_CORRUPT = re.compile(
    r"offset invalid|[Ii]mage is corrupt|[Mm]arking image as corrupt|not in qcow2 format"
    r"|Unsupported qcow2 version|Invalid backing file offset|Backing file name too long"
    r"|Unsupported value|too large|Image too small"
)


def image_error_from_qemu(image: str, message: str) -> ImageError:
    """Classify what a QEMU tool said when it could not open ``image``."""
    message = _tidy_qemu_message(image, message)
    if _IN_USE.search(message):
        return ImageInUse(image, "in use by another process (a running VM?): " + message)
    if _MISSING.search(message):
        return ImageMissing(image, message)
    if _CORRUPT.search(message):
        return ImageCorrupt(image, message)
    return ImageUnreadable(image, message)
