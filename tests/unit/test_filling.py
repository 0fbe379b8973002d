"""Filling: which bitmaps get every bit, how (the QMP sent), what is remembered of a fill, and how
a fill settles what was distrusted (it is where the bitmap's bits begin)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from virt_bitmapd.births import chain_then
from virt_bitmapd.checkpoint_xml import Checkpoint, CheckpointDisk
from virt_bitmapd.filling import Filled, FillStep, fills_now, plan_fill
from virt_bitmapd.health import NextBackup, State, disk_health
from virt_bitmapd.look.judge import Evidence, disabled_in_top, distrust, judge, missing_in_top
from virt_bitmapd.lost_bits import lost_layers
from virt_bitmapd.model import Bitmap, Image
from virt_bitmapd.qmp_marking import fill_transaction
from virt_bitmapd.state_record import DomainState, state_from_json, state_to_json

K64 = 65536


def bm(name: str, *, rec: bool = True, inc: bool = False, g: int = K64) -> Bitmap:
    return Bitmap(name=name, granularity=g, recording=rec, inconsistent=inc)


def image(path: str, *bitmaps: Bitmap, fmt: str = "qcow2") -> Image:
    return Image(path=path, format=fmt, bitmaps=bitmaps)


def checkpoint(name: str, created: int, *chain: str) -> Checkpoint:
    disk = CheckpointDisk(target="vda", bitmap=name, chain_then=chain)
    return Checkpoint(name=name, created=created, disks=(disk,))


def fill_of(*chain: str, created: int = 100, why: str = "a layer was lost") -> Filled:
    return Filled(why=why, checkpoint_created=created, chain=chain, at=1.0)


@pytest.mark.parametrize(
    ("top", "below", "step"),
    [
        ((bm("cp1"),), (), FillStep("cp1", K64)),  # recording: only merged
        ((bm("cp1", rec=False),), (), FillStep("cp1", K64, enable=True)),  # quarantined before
        ((), (bm("cp1", g=2 * K64),), FillStep("cp1", 2 * K64, create=True)),  # missing in top
        ((bm("cp1", inc=True),), (), None),  # QEMU changes no inconsistent bitmap
        ((), (), None),  # nowhere: nothing says its granularity, every reader refuses it
    ],
)
def test_what_filling_a_bitmap_takes(
    top: tuple[Bitmap, ...], below: tuple[Bitmap, ...], step: FillStep | None
) -> None:
    chain = (image("/top", *top), image("/base", *below))
    assert plan_fill(chain, ["cp1"]) == (() if step is None else (step,))


@st.composite
def chains_and_names(draw: st.DrawFn) -> tuple[tuple[Image, ...], list[str]]:
    names = ["a", "b", "c"]
    layers = []
    for index in range(draw(st.integers(1, 5))):
        fmt = draw(st.sampled_from(["qcow2", "qcow2", "raw"]))
        held = draw(st.lists(st.sampled_from(names), unique=True)) if fmt == "qcow2" else []
        bitmaps = tuple(
            Bitmap(
                name=name,
                granularity=draw(st.sampled_from([512, K64, 1 << 20])),
                recording=draw(st.booleans()),
                inconsistent=draw(st.integers(0, 4)) == 0,
            )
            for name in held
        )
        layers.append(image(f"/l{index}", *bitmaps, fmt=fmt))
    return tuple(layers), draw(st.lists(st.sampled_from(names), unique=True))


@given(chains_and_names())
def test_every_bitmap_that_can_be_filled_is_and_nothing_else(
    drawn: tuple[tuple[Image, ...], list[str]],
) -> None:
    chain, names = drawn
    steps = {step.bitmap: step for step in plan_fill(chain, names)}
    top = chain[0]
    for name in names:
        held = [b for image in chain if (b := image.bitmap(name)) is not None]
        copy = top.bitmap(name)
        fillable = top.format == "qcow2" and bool(held) and not (copy and copy.inconsistent)
        assert (name in steps) == fillable
        if name in steps:
            step = steps[name]
            assert step.create == (copy is None)
            assert step.enable == (copy is not None and not copy.recording)
            assert step.granularity == held[0].granularity  # the top's, else the nearest below
    assert set(steps) <= set(names)


def test_nothing_is_filled_in_a_top_that_is_not_qcow2() -> None:
    assert plan_fill((image("/top", fmt="raw"), image("/base", bm("cp1"))), ["cp1"]) == ()


def test_the_fill_is_one_transaction_of_adds_enables_and_merges() -> None:
    steps = (FillStep("a", K64, create=True), FillStep("b", K64, enable=True), FillStep("c", K64))
    actions = fill_transaction("top", steps, source=("sink", "all"))["arguments"]["actions"]
    assert [(a["type"], a["data"].get("name") or a["data"]["target"]) for a in actions] == [
        ("block-dirty-bitmap-add", "a"),
        ("block-dirty-bitmap-merge", "a"),
        ("block-dirty-bitmap-enable", "b"),
        ("block-dirty-bitmap-merge", "b"),
        ("block-dirty-bitmap-merge", "c"),
    ]
    assert actions[0]["data"]["persistent"] and not actions[0]["data"]["disabled"]
    assert actions[1]["data"]["bitmaps"] == [{"node": "sink", "name": "all"}]


def test_a_fill_is_where_the_bitmap_begins() -> None:
    """cp1 was taken on /lost, gone without its bits (its copies start in /base, made after
    it): lost.  Once filled in /top, its run of copies from the top ends in a layer of the
    fill's chain: complete."""
    cp1 = checkpoint("cp1", 100, "/lost")
    chain = [image("/top", bm("cp1")), image("/base", bm("cp1"))]
    assert set(lost_layers(chain, [cp1], "vda")) == {"cp1"}
    filled = {"cp1": fill_of("/top", "/base")}
    assert chain_then(cp1, cp1.disks[0], {}, filled) == ("/top", "/base")
    assert lost_layers(chain, [cp1], "vda", filled=filled) == {}
    # after a snapshot, the fill's layer is below the new top: still complete
    grown = [image("/new", bm("cp1")), *chain]
    assert lost_layers(grown, [cp1], "vda", filled=filled) == {}
    # a checkpoint taken again under the name is another one: the fill says nothing of it
    again = checkpoint("cp1", 200, "/lost")
    assert chain_then(again, again.disks[0], {}, filled) == ("/lost",)


def test_a_fill_stands_while_its_bitmap_exists_and_its_checkpoint_is_the_same() -> None:
    fills = {"cp1": fill_of("/top")}
    chain = [image("/top", bm("cp1"))]
    assert fills_now(fills, chain, [checkpoint("cp1", 100)], "vda") == fills
    assert fills_now(fills, chain, [], "vda") == fills  # not listed for now (transient VM)
    assert fills_now(fills, chain, [checkpoint("cp1", 200)], "vda") == {}  # taken again
    assert fills_now(fills, [image("/top")], [checkpoint("cp1", 100)], "vda") == {}  # deleted


def test_a_disabled_copy_in_the_top_is_distrusted_and_filled_reads_whole_disk() -> None:
    cp1 = checkpoint("cp1", 100, "/top")
    chain = [image("/top", bm("cp1", rec=False))]
    assert "does not record" in disabled_in_top(chain, [cp1], "vda")["cp1"]
    evidence = Evidence(target="vda", checkpoints=[cp1])
    assert set(distrust(chain, evidence, remembered={}, after_commits={})) == {"cp1"}
    # a job running: libvirt may be half-way through its own handling, nothing new is found
    assert distrust(chain, evidence, remembered={}, after_commits={}, job="backup") == {}
    # filled: recording, complete, and said so
    done = [image("/top", bm("cp1"))]
    filled = Evidence(target="vda", checkpoints=[cp1], filled={"cp1": fill_of("/top")})
    (health,) = judge(done, filled, distrust(done, filled, remembered={}, after_commits={}))
    assert (health.state, health.next_backup) == (State.USABLE, NextBackup.WHOLE_DISK)
    assert health.reason == "filled because a layer was lost"


def test_an_untrusted_bitmap_is_never_called_complete_even_if_filled_once() -> None:
    """Distrust found after a fill (a later commit that could not carry its bits) wins."""
    (health,) = disk_health(
        [image("/top", bm("cp1"))],
        [checkpoint("cp1", 100, "/top")],
        "vda",
        {"cp1": "a later commit lost bits"},
        {"cp1": "earlier"},
    )
    assert (health.state, health.next_backup) == (State.UNTRUSTED, NextBackup.MISSES_DATA)


def test_fills_are_kept_in_the_state_directory() -> None:
    state = DomainState(uuid="u", name="vm", chains={"vda": ("/top",)})
    state.filled["vda"] = {"cp1": fill_of("/top", "/base")}
    assert state_from_json("u", state_to_json(state)).filled == state.filled
    state.filled["vda"] = {}
    assert state_to_json(state)["filled"] == {}  # a disk with none: nothing written


def test_a_checkpoint_the_top_lacks_is_found_for_filling() -> None:
    """libvirt refuses it, but an offline reader exports the copy below, short."""
    cp1, cp2 = checkpoint("cp1", 100, "/base"), checkpoint("cp2", 200, "/top")
    chain = [image("/top", bm("cp2")), image("/mid"), image("/base", bm("cp1"))]
    found = missing_in_top(chain, [cp1, cp2], "vda")
    assert list(found) == ["cp1"] and "/base" in found["cp1"]
    assert missing_in_top([image("/top"), image("/base")], [cp1], "vda") == {}  # nowhere
