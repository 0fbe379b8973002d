"""QEMU's own words, produced for real, classified into the error family's kinds."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers.images import create
from virt_bitmapd.errors import (
    ImageCorrupt,
    ImageError,
    ImageInUse,
    ImageMissing,
    ImageUnreadable,
)
from virt_bitmapd.qemu_messages import image_error_from_qemu

pytestmark = pytest.mark.real

NO_CAPABILITIES = ["setpriv", "--inh-caps=-all", "--bounding-set=-all", "--"]


def qemu_img_says(path: Path, *, prefix: list[str] | None = None) -> str:
    result = subprocess.run(
        [*(prefix or []), "qemu-img", "info", "-f", "qcow2", "--output=json", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode != 0, f"qemu-img opened {path}"
    return result.stderr.strip().removeprefix("qemu-img: ")


def storage_daemon_says(path: Path) -> str:
    commands = [
        {"execute": "qmp_capabilities"},
        {
            "execute": "blockdev-add",
            "arguments": {
                "driver": "qcow2",
                "node-name": "n",
                "file": {"driver": "file", "filename": str(path)},
            },
        },
        {"execute": "quit"},
    ]
    result = subprocess.run(
        ["qemu-storage-daemon", "--chardev", "stdio,id=m", "--monitor", "chardev=m"],
        input="".join(json.dumps(c) + "\n" for c in commands),
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    errors = [json.loads(line) for line in result.stdout.splitlines() if '"error"' in line]
    assert errors, result.stdout
    return str(errors[0]["error"]["desc"])


def patch(path: Path, at: int, value: int) -> Path:
    with path.open("r+b") as stream:
        stream.seek(at)
        stream.write(value.to_bytes(8, "big"))
    return path


@pytest.fixture
def held(tmp_path: Path) -> Iterator[Path]:
    image = create(tmp_path / "held.qcow2")
    writer = subprocess.Popen(
        ["qemu-io", "-f", "qcow2", "-c", "sleep 60000", str(image)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(0.5)
    yield image
    writer.kill()
    writer.wait()


def classify(image: Path, message: str) -> ImageError:
    error = image_error_from_qemu(str(image), message)
    assert str(error).startswith(f"{image}: "), error  # the image is named once
    assert str(error).count(str(image)) <= 2, error
    return error


def test_what_qemu_img_says_is_classified(tmp_path: Path, held: Path) -> None:
    missing = tmp_path / "missing.qcow2"
    refcount = patch(create(tmp_path / "refcount.qcow2"), 48, 0xFFFFFFFFFF00)
    l1 = patch(create(tmp_path / "l1.qcow2"), 40, 0xFFFFFFFFFF00)
    raw = create(tmp_path / "raw.img", fmt="raw")
    private = create(tmp_path / "private.qcow2")
    os.chown(private, 65534, 65534)
    os.chmod(private, 0o600)
    cases: list[tuple[Path, str, type[ImageError]]] = [
        (missing, qemu_img_says(missing), ImageMissing),
        (refcount, qemu_img_says(refcount), ImageCorrupt),
        (l1, qemu_img_says(l1), ImageCorrupt),
        (raw, qemu_img_says(raw), ImageCorrupt),
        (private, qemu_img_says(private, prefix=NO_CAPABILITIES), ImageUnreadable),
        (held, qemu_img_says(held), ImageInUse),
        (refcount, storage_daemon_says(refcount), ImageCorrupt),
        (missing, storage_daemon_says(missing), ImageMissing),
        (raw, storage_daemon_says(raw), ImageCorrupt),
    ]
    for image, message, kind in cases:
        error = classify(image, message)
        assert type(error) is kind, (message, error)
    assert classify(held, qemu_img_says(held)).retryable
    assert not classify(missing, qemu_img_says(missing)).retryable
