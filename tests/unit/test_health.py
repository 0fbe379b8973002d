"""Checkpoint health: tables of known cases, and a model of a disk's history as a property."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from virt_bitmapd.checkpoint_xml import Checkpoint, CheckpointDisk, parse_checkpoint
from virt_bitmapd.errors import DomainXMLInvalid
from virt_bitmapd.health import (
    Distrust,
    NextBackup,
    State,
    disk_health,
    to_quarantine,
    untrusted_now,
)
from virt_bitmapd.lost_bits import lost_layers
from virt_bitmapd.model import Bitmap, Image

K64 = 65536


def bm(name: str, *, rec: bool = True, inc: bool = False) -> Bitmap:
    return Bitmap(name=name, granularity=K64, recording=rec, inconsistent=inc)


def img(path: str, *bitmaps: Bitmap) -> Image:
    return Image(path=path, format="qcow2", bitmaps=bitmaps)


def cp(name: str, *chain_then: str, complete: bool = True, target: str = "vda") -> Checkpoint:
    disk = CheckpointDisk(
        target=target, bitmap=name, chain_then=chain_then, chain_then_complete=complete
    )
    return Checkpoint(name=name, created=1, disks=(disk,))


def states(
    chain: list[Image], checkpoints: list[Checkpoint], untrusted: dict[str, str]
) -> dict[str, tuple[State, NextBackup]]:
    return {
        h.bitmap: (h.state, h.next_backup)
        for h in disk_health(chain, checkpoints, "vda", untrusted)
    }


# ---------------------------------------------------------------- tables


def test_a_whole_chain_is_usable_and_safe() -> None:
    chain = [img("s1", bm("cp1"), bm("cp2")), img("base", bm("cp1"))]
    checkpoints = [cp("cp1", "base"), cp("cp2", "s1", "base")]
    assert states(chain, checkpoints, {}) == {
        "cp1": (State.USABLE, NextBackup.SAFE),
        "cp2": (State.USABLE, NextBackup.SAFE),
    }


@pytest.mark.parametrize(
    ("chain", "layer"),
    [
        ([img("s1", bm("cp1", rec=False)), img("base", bm("cp1"))], "s1"),
        ([img("s1", bm("cp1")), img("base", bm("cp1", inc=True))], "base"),
        ([img("s2", bm("cp1")), img("s1"), img("base", bm("cp1"))], "base"),
        ([img("s1"), img("base", bm("cp1"))], "s1"),
    ],
    ids=["disabled", "inconsistent", "gap", "not-in-top"],
)
def test_a_chain_libvirt_refuses_is_broken_with_its_layer(chain: list[Image], layer: str) -> None:
    (health,) = disk_health(chain, [cp("cp1", "base")], "vda", {})
    assert (health.state, health.next_backup, health.layer) == (
        State.BROKEN,
        NextBackup.REFUSED,
        layer,
    )


def test_a_checkpoint_whose_bitmap_is_nowhere_is_missing() -> None:
    (health,) = disk_health([img("s1"), img("base")], [cp("cp1", "base")], "vda", {})
    assert (health.state, health.next_backup) == (State.MISSING, NextBackup.REFUSED)


def test_a_bitmap_no_checkpoint_names_is_an_orphan_once() -> None:
    chain = [img("s1", bm("old")), img("base", bm("old"))]
    (health,) = disk_health(chain, [], "vda", {})
    assert (health.state, health.checkpoint, health.layer) == (State.ORPHAN, None, "s1")


def test_an_untrusted_bitmap_no_checkpoint_names_is_untrusted_not_orphan() -> None:
    (health,) = disk_health([img("base", bm("old"))], [], "vda", {"old": "layers gone"})
    assert (health.state, health.next_backup) == (State.UNTRUSTED, NextBackup.NONE)
    assert "layers gone" in health.reason


def test_untrusted_and_still_accepted_would_miss_data() -> None:
    chain = [img("base", bm("cp1"))]
    (health,) = disk_health(chain, [cp("cp1", "base")], "vda", {"cp1": "layers gone"})
    assert (health.state, health.next_backup) == (State.UNTRUSTED, NextBackup.MISSES_DATA)
    assert health.reason == "layers gone"


def test_untrusted_and_disabled_is_quarantined_and_refused() -> None:
    chain = [img("base", bm("cp1", rec=False))]
    (health,) = disk_health(chain, [cp("cp1", "base")], "vda", {"cp1": "layers gone"})
    assert (health.state, health.next_backup) == (State.UNTRUSTED, NextBackup.REFUSED)
    assert "quarantined" in health.reason


def test_checkpoints_of_other_disks_are_ignored() -> None:
    assert disk_health([img("base")], [cp("cp1", "x", target="vdb")], "vda", {}) == ()


# ---------------------------------------------------------------- lost layers


def test_the_layer_active_at_the_checkpoint_gone_without_its_bits_is_lost() -> None:
    """Issue 12's maintenance: cp2 taken on s1, s1 committed into T without its bitmap and
    deleted, s2 rebased on T: cp2 lives only in s2, which libvirt accepts."""
    chain = [img("s2", bm("cp2")), img("T")]
    lost = lost_layers(chain, [cp("cp2", "s1", "T")], "vda")
    assert set(lost) == {"cp2"} and "s1" in lost["cp2"]


def test_the_layer_committed_with_its_bits_into_one_below_is_fine() -> None:
    chain = [img("s2", bm("cp2")), img("T", bm("cp2"))]
    assert lost_layers(chain, [cp("cp2", "s1", "T")], "vda") == {}


def test_a_copy_gone_from_the_birth_layer_still_in_the_chain_is_lost() -> None:
    chain = [img("s2", bm("cp2")), img("s1"), img("T")]
    assert set(lost_layers(chain, [cp("cp2", "s1", "T")], "vda")) == {"cp2"}


def test_without_the_chain_below_only_commits_seen_prove_a_base() -> None:
    """A checkpoint of a shut-off domain records only its top: a base is proven by a commit
    virt-bitmapd saw handled well."""
    chain = [img("T", bm("cp1"))]
    checkpoints = [cp("cp1", "s1", complete=False)]
    assert set(lost_layers(chain, checkpoints, "vda")) == {"cp1"}
    assert lost_layers(chain, checkpoints, "vda", merged_into={"s1": "mid", "mid": "T"}) == {}


def test_a_checkpoint_not_in_the_top_is_not_lost_but_refused() -> None:
    chain = [img("s2"), img("T", bm("cp2"))]
    assert lost_layers(chain, [cp("cp2", "s1", "T")], "vda") == {}


def test_merged_into_loops_end() -> None:
    chain = [img("x", bm("cp1"))]
    assert set(lost_layers(chain, [cp("cp1", "a")], "vda", merged_into={"a": "b", "b": "a"})) == {
        "cp1"
    }


# ---------------------------------------------------------------- quarantine


def test_only_untrusted_bitmaps_recording_in_the_top_are_quarantined() -> None:
    chain = [
        img("s1", bm("a"), bm("b", rec=False), bm("c"), bm("e", inc=True)),
        img("base", bm("d")),
    ]
    assert to_quarantine(chain, ["a", "b", "d", "e"]) == ("a",)
    assert to_quarantine([], ["a"]) == ()


# ---------------------------------------------------------------- a model of a disk's history


@dataclass
class Layer:
    name: str
    #: bitmap -> (recording, blocks)
    bitmaps: dict[str, tuple[bool, set[int]]] = field(default_factory=dict)


@dataclass
class History:
    chain: list[Layer]
    checkpoints: list[Checkpoint] = field(default_factory=list)
    #: checkpoint -> every block written since it was taken
    truth: dict[str, set[int]] = field(default_factory=dict)
    made: int = 0

    def images(self) -> list[Image]:
        return [
            img(layer.name, *(bm(n, rec=r) for n, (r, _) in layer.bitmaps.items()))
            for layer in self.chain
        ]

    def new_layer(self) -> str:
        self.made += 1
        return f"L{self.made}"

    def checkpoint(self) -> None:
        name = f"cp{len(self.checkpoints)}"
        self.chain[0].bitmaps[name] = (True, set())
        self.checkpoints.append(cp(name, *(layer.name for layer in self.chain)))
        self.truth[name] = set()

    def write(self, block: int) -> None:
        for recording, blocks in self.chain[0].bitmaps.values():
            if recording:
                blocks.add(block)
        for blocks in self.truth.values():
            blocks.add(block)

    def snapshot(self) -> None:
        """libvirt copies every recording bitmap of the old top into the new overlay."""
        top = self.chain[0]
        copies = {n: (True, set[int]()) for n, (rec, _) in top.bitmaps.items() if rec}
        self.chain.insert(0, Layer(self.new_layer(), copies))

    def commit(self, index: int, *, merge: bool) -> None:
        """Layer ``index`` into the one below it, with its bitmaps merged or not; then gone."""
        upper, lower = self.chain[index], self.chain[index + 1]
        if merge:
            for name, (_, blocks) in upper.bitmaps.items():
                recording, below = lower.bitmaps.get(name, (True, set()))
                lower.bitmaps[name] = (recording, below | blocks)
        del self.chain[index]

    def covered(self, name: str) -> set[int]:
        blocks: set[int] = set()
        for layer in self.chain:
            if name not in layer.bitmaps:
                break
            blocks |= layer.bitmaps[name][1]
        return blocks


operations = st.lists(
    st.tuples(st.sampled_from(["checkpoint", "write", "snapshot", "commit"]), st.integers(0, 50)),
    max_size=30,
)


def replay(steps: list[tuple[str, int]], history: History) -> None:
    for op, arg in steps:
        if op == "checkpoint":
            history.checkpoint()
        elif op == "write":
            history.write(arg)
        elif op == "snapshot":
            history.snapshot()
        elif len(history.chain) > 1:
            history.commit(arg % (len(history.chain) - 1), merge=True)


@settings(max_examples=300, deadline=None)
@given(operations)
def test_a_history_of_good_commits_raises_no_alarm(steps: list[tuple[str, int]]) -> None:
    history = History(chain=[Layer("base")])
    replay(steps, history)
    images = history.images()
    assert lost_layers(images, history.checkpoints, "vda") == {}
    for health in disk_health(images, history.checkpoints, "vda", {}):
        assert health.next_backup is NextBackup.SAFE
        assert history.truth[health.bitmap] <= history.covered(health.bitmap)


@settings(max_examples=500, deadline=None)
@given(operations, operations, st.integers(0, 50))
def test_a_birth_layer_committed_without_its_bits_is_never_safe(
    before: list[tuple[str, int]], after: list[tuple[str, int]], pick: int
) -> None:
    """Whatever happened before and after, once the layer a checkpoint was taken on is committed
    without its bitmaps and the checkpoint's copies miss a block written since, the checkpoint
    is never reported safe: libvirt refuses it, or a look names it lost (and the daemon
    remembers it, as it does after every look, until the bitmap is gone)."""
    history = History(chain=[Layer("base")])
    replay(before, history)
    if len(history.chain) < 2:
        return
    index = pick % (len(history.chain) - 1)
    born_here = {
        c.name for c in history.checkpoints if c.disks[0].chain_then[0] == history.chain[index].name
    }
    history.commit(index, merge=False)
    remembered: dict[str, str] = {}
    for step in [None, *after]:
        if step is not None:
            replay([step], history)
        present = {name for layer in history.chain for name in layer.bitmaps}
        remembered = {n: why for n, why in remembered.items() if n in present}
        remembered.update(lost_layers(history.images(), history.checkpoints, "vda"))
    for health in disk_health(history.images(), history.checkpoints, "vda", remembered):
        missed = history.truth[health.bitmap] - history.covered(health.bitmap)
        if health.bitmap in born_here and missed:
            assert health.next_backup is not NextBackup.SAFE, (health, missed)


# ---------------------------------------------------------------- checkpoint XML


CHECKPOINT = """<domaincheckpoint>
  <name>cp2</name>
  <creationTime>1795782955</creationTime>
  <disks>
    <disk name='vda' checkpoint='bitmap' bitmap='cp2'/>
    <disk name='vdb' checkpoint='no'/>
  </disks>
  <domain type='qemu'>
    <name>d</name>
    <devices>
      <disk type='file' device='disk'>
        <driver name='qemu' type='qcow2'/>
        <source file='/i/s1.qcow2'/>
        <backingStore type='file'>
          <format type='qcow2'/>
          <source file='/i/base.qcow2'/>
          <backingStore/>
        </backingStore>
        <target dev='vda' bus='virtio'/>
      </disk>
    </devices>
  </domain>
</domaincheckpoint>"""


def test_a_checkpoint_names_its_bitmap_and_the_chain_it_was_taken_on() -> None:
    checkpoint = parse_checkpoint(CHECKPOINT)
    assert checkpoint.name == "cp2" and checkpoint.created == 1795782955
    assert checkpoint.disks == (
        CheckpointDisk(
            target="vda",
            bitmap="cp2",
            chain_then=("/i/s1.qcow2", "/i/base.qcow2"),
            chain_then_complete=True,
        ),
    )


def test_a_checkpoint_without_its_domain_knows_no_chain() -> None:
    xml = "<domaincheckpoint><name>c</name><disks><disk name='vda'/></disks></domaincheckpoint>"
    (disk,) = parse_checkpoint(xml).disks
    assert (disk.bitmap, disk.chain_then) == ("c", ())


@pytest.mark.parametrize("xml", ["<domain/>", "<domaincheckpoint/>", "not xml"])
def test_what_is_not_a_checkpoint_is_refused(xml: str) -> None:
    with pytest.raises(DomainXMLInvalid):
        parse_checkpoint(xml)


# ---------------------------------------------------------------- what stays untrusted


def test_a_remembered_bitmap_stays_untrusted_until_it_is_gone() -> None:
    remembered = {"cp1": Distrust("layers gone", 1)}
    chain = [img("base", bm("cp1"))]
    assert untrusted_now(remembered, {}, chain, [cp("cp1", "base")], "vda") == remembered
    assert untrusted_now(remembered, {}, [img("base")], [], "vda") == {}


def test_a_checkpoint_taken_again_under_its_name_is_trusted_afresh() -> None:
    remembered = {"cp1": Distrust("layers gone", 5)}
    retaken = Checkpoint(name="cp1", created=9, disks=cp("cp1", "base").disks)
    chain = [img("base", bm("cp1"))]
    assert untrusted_now(remembered, {}, chain, [retaken], "vda") == {}
    # ... unless this look finds it untrusted again, with its new creation time
    found = untrusted_now(remembered, {"cp1": "lost again"}, chain, [retaken], "vda")
    assert found == {"cp1": Distrust("lost again", 9)}


def test_the_first_reason_is_kept_and_absent_bitmaps_are_not_added() -> None:
    remembered = {"cp1": Distrust("first")}
    chain = [img("base", bm("cp1"))]
    found = untrusted_now(remembered, {"cp1": "second", "gone": "x"}, chain, [], "vda")
    assert found == {"cp1": Distrust("first")}
