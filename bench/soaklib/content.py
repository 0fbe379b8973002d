"""What the disk's blocks hold, as the soak knows it: the ground truth of both oracles.

Each layer maps the blocks it holds to the write that put them there (a number no other write
has); a block reads from the top-most layer holding it.  A checkpoint keeps what every block
read when it was taken; the blocks an incremental backup from it must copy are those that read
differently now.  A commit moves data down and changes nothing that is read; a revert (the top
discarded) changes every block the top held: a bitmap, which records writes, cannot know that.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Content:
    #: top first: block -> the write that put it there
    layers: list[dict[int, int]] = field(default_factory=lambda: [{}])
    writes: int = 0

    def write(self, blocks: set[int]) -> None:
        self.writes += 1
        self.layers[0].update(dict.fromkeys(blocks, self.writes))

    def snapshot(self) -> None:
        self.layers.insert(0, {})

    def commit(self, index: int) -> None:
        """Layer ``index`` committed into the one below it."""
        self.layers[index + 1].update(self.layers[index])
        del self.layers[index]

    def discard_top(self) -> None:
        del self.layers[0]

    def flatten(self) -> None:
        """A full copy of the chain into one image."""
        self.layers = [self.read()]

    def read(self) -> dict[int, int]:
        """What every block written so far reads (absent: never written)."""
        seen: dict[int, int] = {}
        for layer in reversed(self.layers):
            seen.update(layer)
        return seen


def changed(then: dict[int, int], now: dict[int, int]) -> set[int]:
    """The blocks that read differently now than ``then``."""
    return {block for block in then.keys() | now.keys() if then.get(block) != now.get(block)}
