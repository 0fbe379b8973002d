"""journald encoding and rendering, sd_notify, metrics bookkeeping."""

from __future__ import annotations

import json
import socket
import struct
import threading
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from virt_bitmapd.errors import StateUnusable
from virt_bitmapd.health import Distrust
from virt_bitmapd.model import Bitmap
from virt_bitmapd.observability.journald import JournalSender, encode
from virt_bitmapd.observability.logs import (
    JournalLogger,
    JournalRenderer,
    add_message_id,
    message_id,
)
from virt_bitmapd.observability.metrics import Metrics
from virt_bitmapd.observability.sdnotify import Notifier
from virt_bitmapd.state import NO_REASON_KEPT, StateStore


def test_journal_encoding_plain_and_multiline() -> None:
    assert encode({"MESSAGE": "hi", "DOMAIN": "vm1"}) == b"MESSAGE=hi\nDOMAIN=vm1\n"
    value = "two\nlines"
    assert encode({"MESSAGE": value}) == b"MESSAGE\n" + struct.pack("<Q", 9) + b"two\nlines\n"


def test_journal_renderer_maps_keys_to_fields() -> None:
    event = add_message_id(
        None,
        "error",
        {
            "event": "reconciliation",
            "domain": "vm1",
            "disk": "vda",
            "bitmaps": ["a", "b"],
            "level": "error",
        },
    )
    fields = JournalRenderer()(None, "error", event)
    assert fields["PRIORITY"] == "3"
    assert fields["SYSLOG_IDENTIFIER"] == "virt-bitmapd"
    assert fields["MESSAGE_ID"] == message_id("reconciliation")
    assert fields["DOMAIN"] == "vm1" and fields["DISK"] == "vda" and fields["BITMAPS"] == "a,b"
    assert fields["MESSAGE"].startswith("reconciliation: ")


def test_journal_logger_falls_back_to_stderr_when_journald_is_gone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stale = tmp_path / "socket"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as gone:
        gone.bind(str(stale))  # the file stays after the socket closes, as journald leaves it
    logger = JournalLogger(JournalSender(str(stale)))
    logger.info(MESSAGE="first", PRIORITY="6")
    logger.error(MESSAGE="second", PRIORITY="3")
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith(f"virt-bitmapd: cannot write to journald at {stale}")
    assert lines[1:] == ["first", "second"]


def test_message_ids_are_stable_and_distinct() -> None:
    assert message_id("reconciliation") == message_id("reconciliation")
    assert message_id("reconciliation") != message_id("disk_skipped")
    assert len(message_id("x")) == 32


def test_notifier_sends_datagrams(tmp_path: Path) -> None:
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(path)
        notifier = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "4000000"})
        assert notifier.watchdog_interval == 2.0
        notifier.ready("up")
        assert server.recv(100) == b"READY=1\nSTATUS=up"
    assert not Notifier({}).send("READY=1") and Notifier({}).watchdog_interval is None


def test_untrusted_gauge_is_dropped_with_the_domain() -> None:
    metrics = Metrics()
    metrics.set_disk_bitmaps("vm1", "vda", {"valid": 2, "inconsistent": 1}, untrusted=1)
    metrics.set_disk_bitmaps("vm1", "vdb", {"valid": 1}, untrusted=2)
    text = generate_latest(metrics.registry).decode()
    assert 'virt_bitmapd_untrusted_bitmaps{domain="vm1"} 3.0' in text
    assert 'virt_bitmapd_bitmaps{state="valid"} 3.0' in text
    metrics.forget_domain("vm1")
    text = generate_latest(metrics.registry).decode()
    assert "vm1" not in text
    assert 'virt_bitmapd_bitmaps{state="valid"} 0.0' in text


def test_state_store_round_trip_and_corruption(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    bitmap = Bitmap(name="cp1", granularity=65536, recording=True)
    store.put_disk(
        "u1",
        name="vm1",
        disk="vda",
        chain=("/a", "/b"),
        untrusted={"cp1": Distrust("layers gone", checkpoint_created=7)},
        bitmaps={"/b": (bitmap,)},
        merged_into={"/s1": "/a"},
    )
    store.put_disk(
        "u1", name="vm1", disk="vdb", chain=("/c",), untrusted={}, bitmaps={}, looked_at=12.5
    )
    state = store.load("u1")
    assert state is not None and state.chains == {"vda": ("/a", "/b"), "vdb": ("/c",)}
    assert state.untrusted["vda"] == {"cp1": Distrust("layers gone", checkpoint_created=7)}
    assert state.merged_into == {"vda": {"/s1": "/a"}}
    assert state.bitmaps["vda"] == {"/b": (bitmap,)}
    assert state.looked_at == {"vdb": 12.5}
    store.drop_disk("u1", "vdb")
    assert store.load("u1").chains == {"vda": ("/a", "/b")}  # type: ignore[union-attr]
    assert store.known() == ["u1"]
    (tmp_path / "domains" / "u1.json").write_text("{half")
    assert StateStore(tmp_path, read_only=True).load("u1") is None
    assert (tmp_path / "domains" / "u1.json").exists()  # a reader never moves it
    assert store.load("u1") is None
    assert (tmp_path / "domains" / "u1.json.corrupt").exists()


def test_a_look_begun_before_a_forget_does_not_bring_the_domain_back(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    before = store.generation("u1")
    assert store.put_disk(
        "u1", name="vm1", disk="vda", chain=("/a",), untrusted={}, bitmaps={}, generation=before
    )
    store.forget("u1")
    assert not store.put_disk(
        "u1", name="vm1", disk="vda", chain=("/a",), untrusted={}, bitmaps={}, generation=before
    )
    store.drop_disk("u1", "vda", before)
    assert store.known() == []
    after = store.generation("u1")  # defined again with the same UUID: tracked again
    assert store.put_disk(
        "u1", name="vm1", disk="vda", chain=("/a",), untrusted={}, bitmaps={}, generation=after
    )
    assert store.known() == ["u1"]


def test_documented_message_ids_are_the_real_ones() -> None:
    readme = (Path(__file__).resolve().parents[2] / "docs" / "operating.md").read_text()
    rows = [line.split("|") for line in readme.splitlines() if line.count("|") == 3]
    # a kind the journal catalog explains is marked " *"
    table = {
        cells[1].strip().removesuffix(" *"): cells[2].strip()
        for cells in rows
        if len(cells[2].strip()) == 32
    }
    assert len(table) >= 5
    for event, documented in table.items():
        assert message_id(event) == documented, event


def test_unwritable_state_directory_is_a_named_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    store = StateStore(blocker)  # "domains" cannot be made under a file
    with pytest.raises(StateUnusable, match=r"cannot (read|save) the state"):
        store.put_disk("u1", name="vm1", disk="vda", chain=("/a",), untrusted={}, bitmaps={})


def test_untrusted_names_of_the_first_format_are_read_with_a_reason(tmp_path: Path) -> None:
    (tmp_path / "domains").mkdir()
    document = {"name": "vm1", "chains": {"vda": ["/a"]}, "untrusted": {"vda": ["cp1"]}}
    (tmp_path / "domains" / "u1.json").write_text(json.dumps(document))
    state = StateStore(tmp_path).load("u1")
    assert state is not None and state.untrusted["vda"] == {"cp1": Distrust(NO_REASON_KEPT)}


def test_disk_series_are_built_when_scraped() -> None:
    metrics = Metrics()
    text = generate_latest(metrics.registry).decode()
    assert 'virt_bitmapd_bitmaps{state="broken_chain"} 0.0' in text  # every state, always
    metrics.set_disk_checkpoints("vm1", "vda", {"usable": 2, "broken": 0})
    metrics.set_disk_checkpoints("vm1", "vdb", {"usable": 1, "missing": 1})
    text = generate_latest(metrics.registry).decode()
    assert 'virt_bitmapd_checkpoints{domain="vm1",state="usable"} 3.0' in text
    assert 'virt_bitmapd_checkpoints{domain="vm1",state="missing"} 1.0' in text
    assert 'state="broken"' not in text  # only states some checkpoint is in
    assert "virt_bitmapd_untrusted_bitmaps{" not in text  # no bitmaps counted yet
    metrics.forget_disk("vm1", "vdb")
    text = generate_latest(metrics.registry).decode()
    assert 'virt_bitmapd_checkpoints{domain="vm1",state="usable"} 2.0' in text
    assert 'state="missing"' not in text
    metrics.forget_disk("vm1", "vda")
    assert "vm1" not in generate_latest(metrics.registry).decode()


def test_each_checkpoint_has_one_series_with_its_state_and_verdict() -> None:
    metrics = Metrics()
    verdicts = (("cp1", "usable", 0), ("cp2", "untrusted", 2))
    metrics.set_disk_checkpoints("vm1", "vda", {"usable": 1, "untrusted": 1}, verdicts)
    metrics.set_disk_checkpoints("vm1", "vdb", {"busy": 1}, (("cp2", "busy", 3),))
    text = generate_latest(metrics.registry).decode()
    name = "virt_bitmapd_checkpoint_verdict"
    series = [line.removeprefix(name) for line in text.splitlines() if line.startswith(name + "{")]
    assert series == [
        '{checkpoint="cp1",disk="vda",domain="vm1",state="usable"} 0.0',
        '{checkpoint="cp2",disk="vda",domain="vm1",state="untrusted"} 2.0',
        '{checkpoint="cp2",disk="vdb",domain="vm1",state="busy"} 3.0',
    ]
    metrics.set_disk_checkpoints("vm1", "vda", {"usable": 1}, (("cp1", "usable", 0),))
    metrics.forget_disk("vm1", "vdb")
    text = generate_latest(metrics.registry).decode()
    assert 'checkpoint="cp2"' not in text  # a checkpoint gone has no series left


def test_disk_series_can_be_scraped_while_looks_change_them() -> None:
    metrics = Metrics()
    stop = threading.Event()

    def scrape() -> None:
        while not stop.is_set():
            generate_latest(metrics.registry)

    scraper = threading.Thread(target=scrape)
    scraper.start()
    try:
        for round_ in range(300):
            for index in range(20):
                domain, disk = f"vm{index}", f"vd{round_ % 3}"
                metrics.set_disk_bitmaps(domain, disk, {"valid": round_ % 4}, untrusted=0)
                metrics.set_disk_checkpoints(domain, disk, {"usable": 1})
                if round_ % 5 == 0:
                    metrics.forget_domain(domain)
    finally:
        stop.set()
        scraper.join()
    text = generate_latest(metrics.registry).decode()
    assert 'virt_bitmapd_checkpoints{domain="vm0",state="usable"}' in text
