"""Records the command line leaves for the daemon."""

from __future__ import annotations

import json
import time
from pathlib import Path

from virt_bitmapd.handover import Handover
from virt_bitmapd.retention import RETENTION


def test_a_record_answers_once_for_the_layers_it_covers(tmp_path: Path) -> None:
    handover = Handover(tmp_path)
    assert handover.record("/i/base", ("/i/s2", "/i/s1"))
    assert handover.take("/i/base", ("/i/s3",)) is None  # not what was reconciled
    assert handover.take("/i/other", ("/i/s1",)) is None
    assert handover.take("/i/base", ("/i/s1",)) is not None
    assert handover.take("/i/base", ("/i/s1",)) is None  # taken


def test_without_the_daemons_state_directory_nothing_is_written(tmp_path: Path) -> None:
    assert not Handover(tmp_path / "absent").record("/i/base", ("/i/s1",))
    assert not (tmp_path / "absent").exists()


def test_old_and_unreadable_records_answer_nothing(tmp_path: Path) -> None:
    handover = Handover(tmp_path)
    handover.record("/i/base", ("/i/s1",))
    (record,) = handover.directory.glob("*.json")
    document = json.loads(record.read_text())
    document["at"] = time.time() - RETENTION - 1
    record.write_text(json.dumps(document))
    assert handover.take("/i/base", ("/i/s1",)) is None and not record.exists()
    handover.record("/i/base", ("/i/s1",))
    (record,) = handover.directory.glob("*.json")
    record.write_text("[not a record")
    assert handover.take("/i/base", ("/i/s1",)) is None
