"""The planner against tables of known cases and against properties over random chains."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from virt_bitmapd.errors import BaseCannotHoldBitmaps, ChainError
from virt_bitmapd.model import Bitmap, BitmapMerge, Chain, Image, Plan, SkipReason
from virt_bitmapd.planner import plan, plan_union

K64 = 65536


def bm(
    name: str, *, g: int = K64, rec: bool = True, inc: bool = False, pers: bool = True
) -> Bitmap:
    return Bitmap(name=name, granularity=g, recording=rec, inconsistent=inc, persistent=pers)


def img(path: str, *bitmaps: Bitmap, fmt: str = "qcow2") -> Image:
    return Image(path=path, format=fmt, bitmaps=bitmaps)


def chain(*images: Image) -> Chain:
    return Chain(images)


# ---------------------------------------------------------------- tables


def test_bitmap_only_in_top_is_created_in_base() -> None:
    result = plan(chain(img("top", bm("a")), img("base")), "top", "base")
    assert result.merges == (
        BitmapMerge(bitmap="a", granularity=K64, create_in_base=True, sources=("top",)),
    )
    assert result.skipped == ()


def test_bitmap_already_in_base_is_merged_not_created() -> None:
    result = plan(chain(img("top", bm("a")), img("base", bm("a"))), "top", "base")
    assert result.merges[0].create_in_base is False


def test_sources_stop_at_first_layer_without_the_bitmap() -> None:
    c = chain(img("top", bm("a")), img("mid1", bm("a")), img("mid2"), img("base"))
    assert plan(c, "top", "base").merges[0].sources == ("top", "mid1")


def test_sources_never_include_base_or_layers_below() -> None:
    c = chain(img("top", bm("a")), img("mid", bm("a")), img("base", bm("a")), img("root", bm("a")))
    assert plan(c, "top", "base").merges[0].sources == ("top", "mid")


def test_granularity_comes_from_top() -> None:
    c = chain(img("top", bm("a", g=1 << 20)), img("mid", bm("a", g=K64)), img("base"))
    assert plan(c, "top", "base").merges[0].granularity == 1 << 20


@pytest.mark.parametrize(
    ("layers", "reason", "where"),
    [
        ((img("top", bm("a", rec=False)), img("base")), SkipReason.DISABLED, "top"),
        ((img("top", bm("a", inc=True)), img("base")), SkipReason.INCONSISTENT, "top"),
        ((img("top", bm("a", pers=False)), img("base")), SkipReason.NOT_PERSISTENT, "top"),
        ((img("top", bm("a")), img("mid"), img("base", bm("a"))), SkipReason.GAP, "base"),
        # libvirt checks down to the END of the chain, below the base too
        ((img("top", bm("a")), img("base"), img("root", bm("a"))), SkipReason.GAP, "root"),
        (
            (img("top", bm("a")), img("base"), img("root", bm("a", inc=True))),
            SkipReason.GAP,
            "root",
        ),
        ((img("top", bm("a")), img("base", bm("a", rec=False))), SkipReason.DISABLED, "base"),
        (
            (img("top", bm("a")), img("base", bm("a")), img("root", bm("a", inc=True))),
            SkipReason.INCONSISTENT,
            "root",
        ),
    ],
)
def test_invalid_chains_are_skipped_with_reason(
    layers: tuple[Image, ...], reason: SkipReason, where: str
) -> None:
    result = plan(Chain(layers), "top", "base")
    assert result.merges == ()
    assert [(s.bitmap, s.reason, s.image) for s in result.skipped] == [("a", reason, where)]


def test_bitmaps_not_in_top_are_reported_once() -> None:
    c = chain(img("top"), img("mid", bm("old")), img("base", bm("old"), bm("b")))
    result = plan(c, "top", "base")
    assert result.merges == ()
    assert [(s.bitmap, s.image, s.reason) for s in result.skipped] == [
        ("old", "mid", SkipReason.NOT_IN_TOP),
        ("b", "base", SkipReason.NOT_IN_TOP),
    ]


def test_commit_top_below_the_active_layer() -> None:
    c = chain(img("active", bm("a")), img("top", bm("a")), img("mid", bm("a")), img("base"))
    assert plan(c, "top", "base").merges[0].sources == ("top", "mid")


def test_raw_base_is_refused_when_bitmaps_must_go_there() -> None:
    with pytest.raises(BaseCannotHoldBitmaps, match=r"raw.*'a' cannot be carried"):
        plan(chain(img("top", bm("a")), img("base", fmt="raw")), "top", "base")


def test_raw_base_with_nothing_to_carry_is_nothing_to_do() -> None:
    result = plan(chain(img("top", bm("a", rec=False)), img("base", fmt="raw")), "top", "base")
    assert result.is_empty and result.skipped[0].reason is SkipReason.DISABLED


@pytest.mark.parametrize(("top", "base"), [("top", "elsewhere"), ("base", "top"), ("top", "top")])
def test_base_must_be_below_top(top: str, base: str) -> None:
    with pytest.raises(ChainError):
        plan(chain(img("top", bm("a")), img("base")), top, base)


def test_unknown_top_is_refused() -> None:
    with pytest.raises(ChainError, match="nowhere"):
        plan(chain(img("top"), img("base")), "nowhere", "base")


def test_bitmap_names_with_spaces_and_non_ascii_pass_through() -> None:
    name = "checkpoint 1 \u2013 Z\u00fcrich"
    result = plan(chain(img("top", bm(name)), img("base")), "top", "base")
    assert result.merges[0].bitmap == name


# ---------------------------------------------------------------- properties

NAMES = ["a", "b", "c", "d"]
GRANULARITIES = [512, K64, 1 << 20]


@st.composite
def chains(draw: st.DrawFn) -> tuple[Chain, int, int]:
    length = draw(st.integers(min_value=1, max_value=8))
    layers = []
    for index in range(length):
        fmt = draw(st.sampled_from(["qcow2", "qcow2", "qcow2", "raw"]))
        bitmaps: tuple[Bitmap, ...] = ()
        if fmt == "qcow2":
            names = draw(st.lists(st.sampled_from(NAMES), unique=True))
            bitmaps = tuple(
                Bitmap(
                    name=name,
                    granularity=draw(st.sampled_from(GRANULARITIES)),
                    recording=draw(st.booleans()),
                    inconsistent=draw(st.integers(0, 5)) == 0,
                    persistent=draw(st.integers(0, 9)) != 0,
                )
                for name in names
            )
        layers.append(Image(path=f"layer{index}", format=fmt, bitmaps=bitmaps))
    if length == 1:  # no base below the top: a chain of one layer commits nothing
        return Chain(tuple(layers)), 0, 0
    top = draw(st.integers(min_value=0, max_value=length - 2))
    base = draw(st.integers(min_value=top + 1, max_value=length - 1))
    if draw(st.booleans()):  # most real bases are qcow2
        layers[base] = replace(layers[base], format="qcow2")
    return Chain(tuple(layers)), top, base


def valid_from(images: tuple[Image, ...], name: str) -> bool:
    """An independent statement of libvirt's rule: the holders are exactly a prefix, all usable."""
    holders = [i for i, image in enumerate(images) if image.bitmap(name) is not None]
    if not holders or holders != list(range(len(holders))):
        return False
    return all(images[i].bitmap(name).usable for i in holders)  # type: ignore[union-attr]


Contents = dict[tuple[str, str], frozenset[int]]


def apply_to_model(c: Chain, p: Plan, contents: Contents) -> tuple[Chain, Contents]:
    """A reference interpreter of a Plan over images whose bitmaps hold sets of blocks."""
    new_contents = dict(contents)
    images = list(c.images)
    base_index = c.index_of(p.base)
    assert base_index is not None
    base = images[base_index]
    for merge in p.merges:
        if merge.create_in_base:
            assert base.bitmap(merge.bitmap) is None
            base = replace(
                base,
                bitmaps=(
                    *base.bitmaps,
                    Bitmap(name=merge.bitmap, granularity=merge.granularity, recording=True),
                ),
            )
        union = new_contents.get((p.base, merge.bitmap), frozenset())
        for source in merge.sources:
            union |= contents.get((source, merge.bitmap), frozenset())
        new_contents[(p.base, merge.bitmap)] = union
    images[base_index] = base
    return Chain(tuple(images)), new_contents


def contents_for(c: Chain, seed: int) -> Contents:
    return {
        (image.path, bitmap.name): frozenset({hash((seed, image.path, bitmap.name)) % 97})
        for image in c
        for bitmap in image.bitmaps
    }


@settings(max_examples=600, deadline=None)
@given(chains(), st.integers(0, 1000))
def test_plan_properties(case: tuple[Chain, int, int], seed: int) -> None:
    c, top_index, base_index = case
    top, base = c.images[top_index], c.images[base_index]
    if top_index == base_index:
        with pytest.raises(ChainError):
            plan(c, top.path, base.path)
        return
    from_top = c.images[top_index:]
    if not base.can_hold_bitmaps and any(valid_from(from_top, b.name) for b in top.bitmaps):
        with pytest.raises(BaseCannotHoldBitmaps):
            plan(c, top.path, base.path)
        return
    p = plan(c, top.path, base.path)
    subchain = [image.path for image in c.images[top_index:base_index]]

    merged = {merge.bitmap for merge in p.merges}
    skipped = {skip.bitmap for skip in p.skipped}
    # every bitmap of TOP is either merged or skipped, never both
    assert merged | (skipped & {b.name for b in top.bitmaps}) == {b.name for b in top.bitmaps}
    assert not merged & skipped
    for merge in p.merges:
        # nothing invalid is merged, and every valid candidate is
        assert valid_from(from_top, merge.bitmap)
        # sources are a contiguous run from TOP, within the subchain, stopping at the first gap
        k = len(merge.sources)
        assert list(merge.sources) == subchain[:k]
        assert k == len(subchain) or c.images[top_index + k].bitmap(merge.bitmap) is None
        assert merge.granularity == top.bitmap(merge.bitmap).granularity  # type: ignore[union-attr]
        assert merge.create_in_base == (base.bitmap(merge.bitmap) is None)
    for bitmap in top.bitmaps:
        assert (bitmap.name in merged) == valid_from(from_top, bitmap.name)

    contents = contents_for(c, seed)
    after, after_contents = apply_to_model(c, p, contents)
    # only BASE is touched
    for index, (old, new) in enumerate(zip(c.images, after.images, strict=True)):
        if index != base_index:
            assert old == new
    assert {k: v for k, v in after_contents.items() if k[0] != base.path} == {
        k: v for k, v in contents.items() if k[0] != base.path
    }
    # every candidate ends present and recording in BASE, holding all its sources' bits
    new_base = after.images[base_index]
    for merge in p.merges:
        copy = new_base.bitmap(merge.bitmap)
        assert copy is not None and copy.usable
        for source in merge.sources:
            assert contents[(source, merge.bitmap)] <= after_contents[(base.path, merge.bitmap)]
    # idempotence: planning again on the result and applying it changes nothing
    again = plan(after, top.path, base.path)
    assert all(not merge.create_in_base for merge in again.merges)
    assert apply_to_model(after, again, after_contents) == (after, after_contents)


def test_base_before_the_commit_decides_validity() -> None:
    # libvirt created "a" in the base while committing: afterwards the walk would see a gap
    after = chain(img("top", bm("a")), img("mid"), img("base", bm("a")))
    assert plan(after, "top", "base").skipped[0].reason is SkipReason.GAP
    verified = plan(after, "top", "base", base_before=img("base"))
    assert verified.merges == (
        BitmapMerge(bitmap="a", granularity=K64, create_in_base=False, sources=("top",)),
    )
    # a gap that was there before the commit stays a gap
    gapped = plan(after, "top", "base", base_before=img("base", bm("a")))
    assert gapped.merges == () and gapped.skipped[0].reason is SkipReason.GAP


def test_base_before_must_be_the_base() -> None:
    with pytest.raises(ChainError):
        plan(chain(img("top"), img("base")), "top", "base", base_before=img("other"))


# ---------------------------------------------------------------- the top holds the union


def test_the_top_gets_the_copies_below_it() -> None:
    images = (img("top", bm("cp1"), bm("cp2")), img("mid", bm("cp1")), img("base", bm("cp1")))
    p = plan_union(images)
    assert p.base == "top" and p.merges == (
        BitmapMerge(bitmap="cp1", granularity=K64, create_in_base=False, sources=("mid", "base")),
    )  # cp2 lives in the top alone: nothing to add


@pytest.mark.parametrize(
    "images",
    [
        (img("top", bm("cp1", rec=False)), img("base", bm("cp1"))),  # quarantined in the top
        (img("top", bm("cp1")), img("mid"), img("base", bm("cp1"))),  # a gap: libvirt refuses
        (img("top", bm("cp1")), img("base", bm("cp1", inc=True))),  # inconsistent below
        (img("top"), img("base", bm("cp1"))),  # not in the top
    ],
)
def test_a_bitmap_libvirt_would_refuse_is_left_alone(images: tuple[Image, ...]) -> None:
    assert plan_union(images).is_empty


@settings(max_examples=400, deadline=None)
@given(chains(), st.integers(0, 1000))
def test_union_properties(case: tuple[Chain, int, int], seed: int) -> None:
    c = case[0]
    images = tuple(replace(i, format="qcow2") for i in c.images)
    p = plan_union(images)
    top = images[0]
    contents = contents_for(Chain(images), seed)
    after, after_contents = apply_to_model(Chain(images), p, contents)
    # only the top's copies change, and only by gaining bits; none is created
    assert after.images == images
    for key, bits in contents.items():
        assert bits <= after_contents[key]
        if key[0] != top.path:
            assert after_contents[key] == bits
    for bitmap in top.bitmaps:
        if valid_from(images, bitmap.name):
            # an offline reader of the top's copy reads what libvirt merges over the chain
            union = frozenset().union(
                *(contents.get((i.path, bitmap.name), frozenset()) for i in images)
            )
            assert after_contents[(top.path, bitmap.name)] == union
        else:
            assert bitmap.name not in {m.bitmap for m in p.merges}
    assert apply_to_model(after, plan_union(after.images), after_contents)[1] == after_contents


# ---------------------------------------------------------------- a commit that also unites


def test_uniting_commit_adds_the_copies_below_the_base() -> None:
    c = chain(
        img("top", bm("cp1"), bm("cp2")),
        img("base", bm("cp1")),
        img("older", bm("cp1")),
        img("oldest", bm("cp1")),
    )
    assert plan(c, "top", "base", unite=True).merges == (
        BitmapMerge(
            bitmap="cp1", granularity=K64, create_in_base=False, sources=("top", "older", "oldest")
        ),
        BitmapMerge(bitmap="cp2", granularity=K64, create_in_base=True, sources=("top",)),
    )


@settings(max_examples=600, deadline=None)
@given(chains(), st.integers(0, 1000))
def test_uniting_commit_leaves_the_base_holding_the_whole_chain(
    case: tuple[Chain, int, int], seed: int
) -> None:
    c, top_index, base_index = case
    c = Chain(tuple(replace(i, format="qcow2") for i in c.images))
    if top_index == base_index:
        return
    top, base = c.images[top_index], c.images[base_index]
    committing = plan(c, top.path, base.path)
    uniting = plan(c, top.path, base.path, unite=True)
    # the same bitmaps, created alike; only sources below the base are added
    assert [(m.bitmap, m.create_in_base) for m in uniting.merges] == [
        (m.bitmap, m.create_in_base) for m in committing.merges
    ]
    assert uniting.skipped == committing.skipped
    contents = contents_for(c, seed)
    _, after = apply_to_model(c, uniting, contents)
    from_top = c.images[top_index:]
    for merge in uniting.merges:
        # BASE's one copy holds what libvirt merges over the chain from TOP
        union = frozenset().union(
            *(contents.get((i.path, merge.bitmap), frozenset()) for i in from_top)
        )
        assert after[(base.path, merge.bitmap)] == union
    for key, bits in contents.items():
        assert bits <= after[key] and (key[0] == base.path or after[key] == bits)
