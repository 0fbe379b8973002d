"""What proves that layers gone from a chain were committed rather than discarded, as tables;
and the reader of the domain's QEMU log that tells whether libvirt started it in between."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from virt_bitmapd.domain_xml import Disk, Layer
from virt_bitmapd.fingerprints import pack_stat
from virt_bitmapd.look.decide import Safeguard, decide
from virt_bitmapd.look.gather import Gathered
from virt_bitmapd.look.proof import marks_after, why_unproven
from virt_bitmapd.marks import Marks
from virt_bitmapd.model import QCOW2, Image
from virt_bitmapd.readers.chain import ChainNow
from virt_bitmapd.readers.qemu_log import (
    ABSENT,
    SYSTEM_LOG_DIR,
    LogMark,
    log_dir_for,
    log_mark,
    started_since,
)
from virt_bitmapd.state_record import DomainState, state_from_json, state_to_json
from virt_bitmapd.tracking import Commit

COMMIT = Commit(removed=("/d",), base="/l")
STAT = pack_stat(1, 100, 4096, 1_000, 1_000)


def look(
    *,
    before: bytes | None = STAT,
    now: bytes | None = STAT,
    started: bool | None = False,
    marked: bool = True,
    running: bool = False,
    old: tuple[str, ...] = ("/d", "/l"),
    chain: tuple[str, ...] = ("/l",),
    upper: tuple[bytes, bytes] = (STAT, STAT),
) -> Gathered:
    """A look at a disk whose chain went from ``old`` to ``chain``; the base /l's stat
    ``before`` (the last look's mark) and ``now``; /a's (a layer above) ``upper``."""
    record = DomainState(uuid="u1", name="vm1", chains={"vda": old})
    if marked:
        record.marks["vda"] = Marks({"/a": upper[0], "/d": STAT, "/l": before}, ABSENT)
    disk = Disk(
        target="vda",
        layers=tuple(Layer(path=p, format=QCOW2, index=None) for p in chain),
        complete=True,
    )
    return Gathered(
        domain=None,
        name="vm1",
        uuid="u1",
        target="vda",
        running=running,
        generation=0,
        started_ns=0,
        record=record,
        stats_after_read={"/a": upper[1], "/d": None, "/l": now},
        started_since=started,
        now=ChainNow(
            disk=disk, paths=chain, images=tuple(Image(path=p, format=QCOW2) for p in chain)
        ),
    )


WRITTEN = pack_stat(1, 100, 8192, 2_000, 2_000)


@pytest.mark.parametrize(
    ("gathered", "job_done", "unproven"),
    [
        # libvirt's event for the commit (or pull) is proof whatever the files say
        (look(now=STAT), True, None),
        # the base written since the last look, and the domain did not start: a commit
        (look(now=WRITTEN), False, None),
        # the base untouched: the layers were discarded (a revert), not committed
        (look(now=STAT), False, "/l was not written since the last look"),
        # only its owner or label changed (libvirt relabels at start and stop): no write
        (look(now=pack_stat(1, 100, 4096, 1_000, 5_000)), False, "not written"),
        # another file at the base's path
        (look(now=pack_stat(1, 999, 8192, 2_000, 2_000)), False, "another file"),
        # written, but the domain started meanwhile: its writes may be in no bitmap
        (look(now=WRITTEN, started=True), False, "the domain started since the last look"),
        # written, and the log cannot say whether it started
        (look(now=WRITTEN, started=None), False, "cannot be told"),
        # nothing to compare with (a state file of an earlier version, an unreadable base)
        (look(now=WRITTEN, marked=False), False, "no earlier look left a stat of /l"),
        (look(before=None, now=WRITTEN), False, "no earlier look left a stat of /l"),
        (look(now=None), False, "no earlier look left a stat of /l"),
        # running, and not started since: only libvirt's jobs change a running chain
        (look(now=STAT, running=True), False, None),
        (look(now=WRITTEN, running=True, started=True), False, "started since"),
        # the base stayed below a layer the last look knew: a run wrote into that one
        (look(now=WRITTEN, started=True, old=("/a", "/d", "/l"), chain=("/a", "/l")), False, None),
        # ... but not below a layer made since (the base may have been the top meanwhile)
        (look(now=WRITTEN, started=None, chain=("/new", "/l")), False, "cannot be told"),
        # the layer above the ones gone written (a pull at rest: qemu-img rebase): proof too
        (look(old=("/a", "/d", "/l"), chain=("/a", "/l"), upper=(STAT, WRITTEN)), False, None),
        (look(old=("/a", "/d", "/l"), chain=("/a", "/l")), False, "/a was not written"),
    ],
)
def test_what_proves_a_layer_gone_was_committed(
    gathered: Gathered, job_done: bool, unproven: str | None
) -> None:
    why = why_unproven(COMMIT, gathered, job_done=job_done)
    if unproven is None:
        assert why is None
    else:
        assert why is not None and unproven in why


def test_decide_names_each_commit_nothing_proves() -> None:
    decision = decide(look(now=STAT), copied=False, safeguard=Safeguard.FILL, heal=False)
    assert decision.commits == (COMMIT,)
    assert "not written" in decision.unproven[COMMIT]
    proven = decide(look(now=WRITTEN), copied=False, safeguard=Safeguard.FILL, heal=False)
    assert proven.commits == (COMMIT,) and proven.unproven == {}
    by_event = decide(
        look(now=STAT), copied=False, safeguard=Safeguard.FILL, heal=False, job_done=True
    )
    assert by_event.unproven == {}


def test_marks_survive_the_state_file() -> None:
    state = DomainState(uuid="u1", name="vm1", chains={"vda": ("/l",)})
    state.marks["vda"] = Marks({"/l": STAT, "/gone": None}, LogMark(3, 4, 5))
    again = state_from_json("u1", state_to_json(state))
    assert again.marks == state.marks
    assert again.marks["vda"].identities() == {"/l": (1, 100)}


STARTING = b"2026-12-05 10:21:10.375+0000: starting up libvirt version: 9.0.0, qemu 7.2\n"
STOPPING = b"2026-12-05 10:21:12.941+0000: shutting down, reason=destroyed\n"


def appended(log: Path, then: LogMark | None, data: bytes = b"") -> bool | None:
    if data:
        with log.open("ab") as out:
            out.write(data)
    now = log_mark(str(log.parent), "vm1")
    return started_since(str(log.parent), "vm1", then, now)


def test_a_start_shows_in_what_the_log_gained_since_the_last_look(tmp_path: Path) -> None:
    log = tmp_path / "vm1.log"
    assert log_mark(str(tmp_path), "vm1") == ABSENT
    assert appended(log, ABSENT) is False  # never started, still no log
    assert appended(log, ABSENT, STARTING) is True  # the log made by a start
    mark = log_mark(str(tmp_path), "vm1")
    assert appended(log, mark, STOPPING) is False  # a stop is no start
    mark = log_mark(str(tmp_path), "vm1")
    assert appended(log, mark, b"qemu: terminating on signal 15\n" + STARTING) is True
    mark = log_mark(str(tmp_path), "vm1")
    assert appended(log, mark) is False  # nothing since


def test_a_log_that_cannot_tell_proves_nothing(tmp_path: Path) -> None:
    log = tmp_path / "vm1.log"
    log.write_bytes(STARTING + STOPPING)
    mark = log_mark(str(tmp_path), "vm1")
    assert mark is not None
    log.write_bytes(STOPPING)  # truncated since (rotated with copytruncate)
    assert appended(log, mark) is None
    os.unlink(log)
    log.write_bytes(STOPPING + STARTING + STOPPING)  # replaced (maybe at the same inode)
    assert appended(log, mark) is None
    os.unlink(log)
    assert appended(log, mark) is None  # removed since
    assert appended(log, None) is None  # no mark from the last look
    assert started_since(None, "vm1", ABSENT, ABSENT) is None  # no known log directory
    (tmp_path / "vm2.log").symlink_to(log)
    assert log_mark(str(tmp_path), "vm2") is None  # not a regular file: not followed
    assert log_mark(str(tmp_path), "../vm1") is None


def test_a_start_before_the_mark_is_no_news(tmp_path: Path) -> None:
    log = tmp_path / "vm1.log"
    log.write_bytes(STARTING)
    mark = log_mark(str(tmp_path), "vm1")
    assert appended(log, mark, STOPPING) is False


def test_a_start_written_as_the_mark_was_taken_is_still_seen(tmp_path: Path) -> None:
    log = tmp_path / "vm1.log"
    log.write_bytes(STOPPING + STARTING[:20])  # the mark falls inside the line
    mark = log_mark(str(tmp_path), "vm1")
    assert appended(log, mark, STARTING[20:]) is True


def test_only_the_system_instance_has_a_known_log_directory() -> None:
    assert log_dir_for("qemu:///system") == SYSTEM_LOG_DIR
    assert log_dir_for("qemu:///session") is None
    assert log_dir_for("qemu+ssh://host/system") is None


@pytest.mark.parametrize(
    ("chain", "touched", "kept"),
    [
        (("/d", "/l"), False, True),  # nothing changed the chain: the base's old stat stays
        (("/l",), False, False),  # the chain changed: what it is now is the new reference
        (("/d", "/l"), True, False),  # the look wrote an image: its own write is no news
    ],
)
def test_a_look_between_a_commit_and_the_chain_change_keeps_the_reference(
    chain: tuple[str, ...], touched: bool, kept: bool
) -> None:
    """``qemu-img commit`` writes the base; the chain changes later (a rebase, a new XML).  A
    look in between must not make that write look older than the chain."""
    gathered = look(now=WRITTEN, chain=("/d", "/l"))
    left = {"/d": STAT, "/l": WRITTEN}
    marks = marks_after(gathered, chain, left, touched=touched)
    assert marks.layers["/l"] == (STAT if kept else WRITTEN)
    assert marks.qemu_log == gathered.log_mark
