"""Records the command line leaves for the daemon: bound to the files they name, used once."""

from __future__ import annotations

import json
import time
from pathlib import Path

from virt_bitmapd.handover import Handover, identity_of
from virt_bitmapd.retention import RETENTION


def layers(folder: Path, *names: str) -> tuple[str, ...]:
    paths = []
    for name in names:
        path = folder / name
        path.write_text(name)
        paths.append(str(path))
    return tuple(paths)


def seen(*paths: str) -> dict[str, tuple[int, int]]:
    found = {path: identity_of(path) for path in paths}
    return {path: identity for path, identity in found.items() if identity is not None}


def test_a_record_answers_once_for_the_files_it_covers(tmp_path: Path) -> None:
    handover = Handover(tmp_path)
    base, s2, s1, s3 = layers(tmp_path, "base", "s2", "s1", "s3")
    assert handover.record(base, (s2, s1))
    last = seen(s2, s1, s3)
    assert handover.take(base, (s3,), last) is None  # not what was reconciled
    assert handover.take(str(tmp_path / "other"), (s1,), last) is None
    assert handover.take(base, (s1,), last) is not None
    assert handover.take(base, (s1,), last) is None  # taken


def test_a_record_names_files_not_paths(tmp_path: Path) -> None:
    """A later layer at a reused path is another file: the record is not its proof."""
    handover = Handover(tmp_path)
    base, s1 = layers(tmp_path, "base", "s1")
    handover.record(base, (s1,))
    Path(s1).unlink()
    keep = tmp_path / "keep"
    keep.write_text("holds the old inode number so the new file cannot reuse it")
    (new,) = layers(tmp_path, "s1")
    assert handover.take(base, (s1,), seen(new)) is None
    assert list(handover.directory.glob("*.json")) == []  # a record that does not fit goes
    handover.record(base, (s1,))
    assert handover.take(base, (s1,), {}) is None  # no look saw which file was there


def test_a_commit_the_daemon_reconciled_itself_drops_the_record(tmp_path: Path) -> None:
    handover = Handover(tmp_path)
    base, s1, s2 = layers(tmp_path, "base", "s1", "s2")
    handover.record(base, (s1,))
    handover.drop(base, (s2,))  # another commit: kept
    assert list(handover.directory.glob("*.json"))
    handover.drop(base, (s1,))
    assert handover.take(base, (s1,), seen(s1)) is None


def test_without_the_daemons_state_directory_nothing_is_written(tmp_path: Path) -> None:
    assert not Handover(tmp_path / "absent").record("/i/base", ("/i/s1",))
    assert not (tmp_path / "absent").exists()


def test_old_and_unreadable_records_answer_nothing(tmp_path: Path) -> None:
    handover = Handover(tmp_path)
    base, s1 = layers(tmp_path, "base", "s1")
    handover.record(base, (s1,))
    (record,) = handover.directory.glob("*.json")
    document = json.loads(record.read_text())
    document["at"] = time.time() - RETENTION - 1
    record.write_text(json.dumps(document))
    assert handover.take(base, (s1,), seen(s1)) is None and not record.exists()
    handover.record(base, (s1,))
    (record,) = handover.directory.glob("*.json")
    record.write_text("[not a record")
    assert handover.take(base, (s1,), seen(s1)) is None
    record.write_text(json.dumps({"base": base, "layers": [s1], "at": time.time()}))
    assert handover.take(base, (s1,), seen(s1)) is None  # an unbound record proves nothing
