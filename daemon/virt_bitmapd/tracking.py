"""Which commits turned a known chain into the chain seen now.  Pure.

Events name neither the top nor the base of a commit, and commits done outside libvirt send no
event at all, so commits are found by comparing a disk's last known chain with its current one:
layers that went away while the layer below them stayed form a committed subchain, and that
layer below is its base.  Several commits between two looks show as several such runs.
Layers that appear (new snapshots) or a chain replaced wholesale commit nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = [
    "Commit",
    "LayersAbove",
    "detect_commits",
    "grew_on_top",
    "hidden_commits",
    "layers_above",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class Commit:
    """``removed`` (top first) were committed into ``base``; ``top`` is ``removed[0]``."""

    removed: tuple[str, ...]
    base: str
    #: Found by its files rather than by the chain: layers no look saw in it (``hidden_commits``).
    hidden: bool = False

    def __post_init__(self) -> None:
        if not self.removed:
            raise ValueError("a commit removes at least one layer")
        if self.base in self.removed:
            raise ValueError(f"{self.base} cannot be both removed and the base")

    @property
    def top(self) -> str:
        return self.removed[0]


def detect_commits(old: Sequence[str], new: Sequence[str]) -> tuple[Commit, ...]:
    """Commits that explain going from chain ``old`` to chain ``new`` (both top first)."""
    kept = set(new)
    commits = []
    run: list[str] = []
    for path in old:
        if path not in kept:
            run.append(path)
            continue
        if run:
            commits.append(Commit(removed=tuple(run), base=path))
            run = []
    # A run that reaches the end of the old chain has no base left: nothing was committed into
    # a layer we know (the chain was cut or replaced), so it is not a commit.
    return tuple(commits)


def copied_away(old: Sequence[str], new: Sequence[str]) -> tuple[str, ...]:
    """The layers a block copy replaced, going from chain ``old`` to ``new`` (top first): those
    above the first layer kept (all of them for a full copy), when the new top is a new image.
    libvirt copies their data, and their bitmaps, into the new top."""
    if not new or new[0] in old:
        return ()
    kept = set(new)
    replaced = []
    for path in old:
        if path in kept:
            break
        replaced.append(path)
    return tuple(replaced)


def grew_on_top(old: Sequence[str], new: Sequence[str]) -> bool:
    """Whether ``new`` is ``old`` with layers added above it (snapshots), nothing else changed."""
    return len(new) > len(old) > 0 and tuple(new[len(new) - len(old) :]) == tuple(old)


@dataclass(frozen=True, slots=True)
class LayersAbove:
    """Images made on top of a layer, as one run (top first, ending just above it); and, where
    more than one image backs onto the same layer, those images (a fork: which of them the run
    goes on with cannot be told)."""

    run: tuple[str, ...] = ()
    forks: tuple[str, ...] = ()


def layers_above(layer: str, backing_of: Mapping[str, str]) -> LayersAbove:
    """Follow ``backing_of`` (image -> its backing file) upwards from ``layer``.

    A commit that took the top of a known chain away may have taken layers made on it since
    (snapshots never seen) as well; their files still say what they were made on."""
    run: list[str] = []
    current = layer
    while len(run) < len(backing_of):
        children = sorted(
            image for image, backing in backing_of.items() if backing == current and image != layer
        )
        children = [child for child in children if child not in run]
        if not children:
            break
        if len(children) > 1:
            return LayersAbove(tuple(reversed(run)), forks=tuple(children))
        run.append(children[0])
        current = children[0]
    return LayersAbove(tuple(reversed(run)))


def hidden_commits(chain: Sequence[str], backing_of: Mapping[str, str]) -> tuple[Commit, ...]:
    """Commits into layers of ``chain`` (top first) that the chain no longer shows.

    ``backing_of`` maps files that are in no domain's chain and changed since the last look to
    what they back onto.  Maintenance between two looks can commit a layer and rebase the one
    above it onto the base (``qemu-img commit`` then ``qemu-img rebase -u``): the chain then only
    seems to have grown, but the committed layer's file is still there, backing onto a layer of
    the chain.  Every such file, and each file made on it, is taken as committed into that layer:
    one run per file that nothing backs onto, top first, ending just above the chain.  Merging a
    run that was discarded rather than committed adds bits, never takes any: a slightly larger
    backup, never a missed block.  A run that does not reach the chain is left alone."""
    in_chain = set(chain)
    backed_onto = set(backing_of.values())
    commits = []
    for tip in sorted(path for path in backing_of if path not in backed_onto):
        run = [tip]
        while backing_of.get(run[-1]) in backing_of and len(run) <= len(backing_of):
            run.append(backing_of[run[-1]])
        base = backing_of.get(run[-1])
        if base in in_chain and not in_chain.intersection(run):
            commits.append(Commit(removed=tuple(run), base=str(base), hidden=True))
    return tuple(commits)
