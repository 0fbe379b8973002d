"""Commit detection from two chains, by table and by property."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from virt_bitmapd.tracking import (
    Commit,
    LayersAbove,
    copied_away,
    detect_commits,
    grew_on_top,
    hidden_commits,
    layers_above,
)


@pytest.mark.parametrize(
    ("old", "new", "commits"),
    [
        ("abc", "abc", []),
        ("bc", "abc", []),  # a new snapshot
        ("abc", "ac", [("b", "c")]),  # non-active commit of b into c
        ("abc", "c", [("ab", "c")]),  # active commit of a and b into c
        ("abcd", "ad", [("bc", "d")]),
        ("abcde", "ace", [("b", "c"), ("d", "e")]),  # two commits between two looks
        ("abc", "xc", [("ab", "c")]),  # committed, then a new snapshot on top
        ("abc", "xyz", []),  # replaced wholesale: no base left, not a commit
        ("abc", "ab", []),  # the bottom went away (rebase onto nothing): not a commit
    ],
)
def test_detect_commits(old: str, new: str, commits: list[tuple[str, str]]) -> None:
    found = detect_commits(tuple(old), tuple(new))
    assert [("".join(c.removed), c.base) for c in found] == commits


def test_commit_checks_itself() -> None:
    with pytest.raises(ValueError):
        Commit(removed=(), base="a")
    with pytest.raises(ValueError):
        Commit(removed=("a",), base="a")


@given(st.lists(st.integers(0, 30), min_size=1, max_size=10, unique=True), st.data())
def test_removing_layers_is_explained_by_commits(chain: list[int], data: st.DataObject) -> None:
    old = tuple(f"l{i}" for i in chain)
    keep = data.draw(st.lists(st.booleans(), min_size=len(old), max_size=len(old)))
    new = tuple(path for path, kept in zip(old, keep, strict=True) if kept)
    commits = detect_commits(old, new)
    removed = [path for commit in commits for path in commit.removed]
    # every removed layer that had a surviving layer below it is in exactly one commit
    last_kept = max((i for i, k in enumerate(keep) if k), default=-1)
    assert removed == [p for i, p in enumerate(old) if not keep[i] and i < last_kept]
    for commit in commits:
        assert commit.base in new
        start = old.index(commit.top)
        assert old[start : start + len(commit.removed)] == commit.removed
        assert old[start + len(commit.removed)] == commit.base


@pytest.mark.parametrize(
    ("old", "new", "grew"),
    [
        ("a b", "c a b", True),
        ("a b", "d c a b", True),
        ("a b", "a b", False),
        ("a b", "c b", False),  # a commit, not a snapshot
        ("a b", "c a", False),
        ("", "a", False),  # nothing known yet: a first look, not growth
        ("a b", "b", False),
    ],
)
def test_grew_on_top(old: str, new: str, grew: bool) -> None:
    assert grew_on_top(old.split(), new.split()) is grew


@pytest.mark.parametrize(
    ("old", "new", "replaced"),
    [
        ("s1 base", "dest base", "s1"),  # a shallow copy
        ("s2 s1 base", "dest", "s2 s1 base"),  # a full copy
        ("s1 base", "s1 base", ""),
        ("s1 base", "base", ""),  # a commit: the new top is not new
        ("", "dest", ""),
    ],
)
def test_copied_away(old: str, new: str, replaced: str) -> None:
    assert copied_away(old.split(), new.split()) == tuple(replaced.split())


@pytest.mark.parametrize(
    ("backing_of", "found"),
    [
        ({}, LayersAbove()),
        ({"x": "elsewhere"}, LayersAbove()),
        ({"u1": "a"}, LayersAbove(("u1",))),
        ({"u1": "a", "u2": "u1", "x": "b"}, LayersAbove(("u2", "u1"))),
        ({"u1": "a", "u2": "a"}, LayersAbove(forks=("u1", "u2"))),
        ({"u1": "a", "u2": "u1", "u3": "u1"}, LayersAbove(("u1",), forks=("u2", "u3"))),
        ({"u1": "a", "a": "u1"}, LayersAbove(("u1",))),  # a loop cannot hang it
    ],
)
def test_layers_above(backing_of: dict[str, str], found: LayersAbove) -> None:
    assert layers_above("a", backing_of) == found


@given(
    st.integers(0, 6),
    st.dictionaries(st.sampled_from([f"x{i}" for i in range(8)]), st.sampled_from(["y", "z"])),
)
def test_layers_above_finds_exactly_a_run_made_on_the_layer(
    length: int, unrelated: dict[str, str]
) -> None:
    """A run of snapshots on ``a`` among files made on other images is found whole, top first;
    a second image made on a layer of the run makes a fork there, never a guess."""
    run = [f"u{i}" for i in range(length)]
    backing_of = dict(unrelated)
    below = "a"
    for layer in run:
        backing_of[layer] = below
        below = layer
    assert layers_above("a", backing_of) == LayersAbove(tuple(reversed(run)))
    if length > 1:
        backing_of["fork"] = "u0"  # u1 and fork were both made on u0
        assert layers_above("a", backing_of) == LayersAbove(("u0",), forks=("fork", "u1"))


@pytest.mark.parametrize(
    ("backing_of", "expected"),
    [
        ({}, ()),
        ({"/s1": "/t"}, (("/s1",), "/t")),  # the case: s1 committed, s2 rebased onto t
        ({"/s2": "/s1", "/s1": "/t"}, (("/s2", "/s1"), "/t")),  # a run of two
        ({"/x": "/elsewhere"}, ()),  # backs onto nothing of this chain
        ({"/x": "/y", "/y": "/gone"}, ()),
    ],
)
def test_files_committed_between_two_looks_are_found(
    backing_of: dict[str, str], expected: tuple[tuple[str, ...], str] | tuple[()]
) -> None:
    found = hidden_commits(("/top", "/t", "/below"), backing_of)
    if not expected:
        assert found == ()
    else:
        assert [(c.removed, c.base, c.hidden) for c in found] == [(*expected, True)]


def test_every_file_on_the_chain_is_merged_never_one_guessed() -> None:
    """Two files made on one layer: both are merged (bits added), neither chosen."""
    found = hidden_commits(("/top", "/t"), {"/a": "/t", "/b": "/t", "/c": "/a"})
    assert sorted((c.removed, c.base) for c in found) == [(("/b",), "/t"), (("/c", "/a"), "/t")]


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["/a", "/b", "/c", "/d", "/e"]),
        st.sampled_from(["/a", "/b", "/c", "/t", "/u", "/v"]),
        max_size=5,
    )
)
def test_hidden_commits_end_on_the_chain_and_never_take_a_chain_layer(
    backing_of: dict[str, str],
) -> None:
    chain = ("/u", "/t", "/v")
    for commit in hidden_commits(chain, backing_of):
        assert commit.base in chain and not set(commit.removed) & set(chain)
        assert all(backing_of[a] == b for a, b in itertools.pairwise(commit.removed))
        assert backing_of[commit.removed[-1]] == commit.base
