"""Healing plans: tables of the cases the superset argument covers and those it refuses, and
a property: a plan applied leaves every healed bitmap with a chain libvirt accepts."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from virt_bitmapd.checkpoint_xml import Checkpoint, CheckpointDisk
from virt_bitmapd.healing import HealStep, plan_healing
from virt_bitmapd.model import Bitmap, Image
from virt_bitmapd.planner import bitmap_chain_problem

K64 = 65536


def bm(name: str, *, rec: bool = True, inc: bool = False, g: int = K64) -> Bitmap:
    return Bitmap(name=name, granularity=g, recording=rec, inconsistent=inc)


def img(path: str, *bitmaps: Bitmap) -> Image:
    return Image(path=path, format="qcow2", bitmaps=bitmaps)


def taken_on(name: str, *chain: str) -> Checkpoint:
    disk = CheckpointDisk(target="vda", bitmap=name, chain_then=chain, chain_then_complete=True)
    return Checkpoint(name=name, created=1, disks=(disk,))


def test_an_overlay_made_without_the_bitmap_gets_it_from_its_allocation() -> None:
    plan = plan_healing([img("o"), img("base", bm("cp1", g=2 * K64))])
    assert plan.steps == (HealStep(image="o", bitmap="cp1", granularity=2 * K64),)
    assert plan.refused == () and plan.images == ("o",)


def test_a_gap_is_filled() -> None:
    plan = plan_healing([img("s2", bm("cp1")), img("s1"), img("base", bm("cp1"))])
    assert [(s.image, s.bitmap) for s in plan.steps] == [("s1", "cp1")]


def test_a_valid_chain_needs_nothing() -> None:
    plan = plan_healing([img("s1", bm("cp1")), img("base", bm("cp1")), img("root")])
    assert plan.steps == () and plan.refused == ()


@pytest.mark.parametrize(
    ("chain", "words"),
    [
        ([img("o"), img("base", bm("cp1", rec=False))], "disabled"),
        ([img("o"), img("base", bm("cp1", inc=True))], "inconsistent"),
        ([img("s2"), img("s1", bm("cp1", rec=False)), img("base", bm("cp1"))], "not recording"),
    ],
    ids=["anchor-disabled", "anchor-inconsistent", "copy-above-disabled"],
)
def test_what_the_superset_argument_does_not_cover_is_refused(
    chain: list[Image], words: str
) -> None:
    plan = plan_healing(chain)
    assert plan.steps == ()
    (refusal,) = plan.refused
    assert refusal.bitmap == "cp1" and words in refusal.reason


def test_an_untrusted_bitmap_is_never_healed() -> None:
    plan = plan_healing([img("o"), img("base", bm("cp1"))], untrusted={"cp1"})
    assert plan.steps == () and "cannot prove" in plan.refused[0].reason


def test_a_checkpoint_taken_on_another_layer_is_refused() -> None:
    chain = [img("o"), img("s1", bm("cp1")), img("base")]
    plan = plan_healing(chain, checkpoints=[taken_on("cp1", "base")], target="vda")
    assert plan.steps == () and "taken on base" in plan.refused[0].reason


def test_a_layer_that_existed_before_the_checkpoint_is_refused() -> None:
    """Against libvirt's rule (someone added the bitmap to a backing file by hand)."""
    chain = [img("o"), img("base", bm("cp1"))]
    plan = plan_healing(chain, checkpoints=[taken_on("cp1", "base", "old-o")], target="vda")
    assert plan.steps != ()  # "o" is not in the chain the checkpoint was taken on
    chain = [img("o"), img("base", bm("cp1"))]
    plan = plan_healing(chain, checkpoints=[taken_on("cp1", "o", "base")], target="vda")
    assert plan.steps == () and plan.refused


def test_with_the_checkpoint_agreeing_the_overlay_is_healed() -> None:
    chain = [img("o"), img("base", bm("cp1"))]
    plan = plan_healing(chain, checkpoints=[taken_on("cp1", "base")], target="vda")
    assert [(s.image, s.bitmap) for s in plan.steps] == [("o", "cp1")]


def apply(chain: list[Image], steps: tuple[HealStep, ...]) -> list[Image]:
    healed = []
    for image in chain:
        added = tuple(bm(s.bitmap, g=s.granularity) for s in steps if s.image == image.path)
        healed.append(replace(image, bitmaps=image.bitmaps + added))
    return healed


copies = st.lists(
    st.sampled_from(["none", "ok", "disabled", "inconsistent"]), min_size=1, max_size=6
)


@settings(max_examples=400, deadline=None)
@given(copies)
def test_a_plan_applied_leaves_a_valid_chain_or_says_why_not(layers: list[str]) -> None:
    flags = {"ok": {}, "disabled": {"rec": False}, "inconsistent": {"inc": True}}
    chain = [
        img(f"L{index}", *([] if kind == "none" else [bm("cp", **flags[kind])]))
        for index, kind in enumerate(layers)
    ]
    plan = plan_healing(chain)
    if "cp" in {r.bitmap for r in plan.refused}:
        assert plan.steps == ()
        return
    healed = apply(chain, plan.steps)
    if any(image.bitmap("cp") for image in chain):
        assert bitmap_chain_problem(tuple(healed), "cp") is None
    # never a copy made in a layer below the lowest one: those predate the checkpoint
    lowest = max((i for i, k in enumerate(layers) if k != "none"), default=-1)
    assert all(int(step.image[1:]) < lowest for step in plan.steps)
