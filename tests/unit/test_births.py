"""Where a checkpoint was taken, when its XML does not say: remembered from when libvirt did,
else nothing proves it and it is not trusted."""

from __future__ import annotations

from virt_bitmapd.births import MAX_REMEMBERED, births_now, chain_then
from virt_bitmapd.checkpoint_xml import Checkpoint, CheckpointDisk
from virt_bitmapd.lost_bits import NO_BIRTH, lost_layers
from virt_bitmapd.model import Bitmap, Image

K64 = 65536


def checkpoint(name: str, created: int, *chain: str) -> Checkpoint:
    disk = CheckpointDisk(target="vda", bitmap=name, chain_then=chain)
    return Checkpoint(name=name, created=created, disks=(disk,))


def image(path: str, *names: str) -> Image:
    bitmaps = tuple(Bitmap(name=n, granularity=K64, recording=True) for n in names)
    return Image(path=path, format="qcow2", bitmaps=bitmaps)


def test_libvirts_word_is_remembered_and_outlives_a_redefinition_without_it() -> None:
    said = births_now([checkpoint("cp1", 100, "/s1", "/base")], "vda", {})
    assert said == {"cp1": (100, "/s1")}
    # libvirt lists the checkpoint no more (a transient VM down), then again without <domain>
    assert births_now([], "vda", said) == said
    redefined = checkpoint("cp1", 100)
    assert births_now([redefined], "vda", said) == said
    assert chain_then(redefined, redefined.disks[0], said) == ("/s1",)


def test_a_checkpoint_taken_again_under_its_name_is_not_the_one_remembered() -> None:
    said = births_now([checkpoint("cp1", 100, "/s1")], "vda", {})
    again = checkpoint("cp1", 200)
    assert chain_then(again, again.disks[0], said) is None


def test_only_the_newest_are_kept() -> None:
    many = [checkpoint(f"cp{n}", n, "/base") for n in range(MAX_REMEMBERED + 10)]
    kept = births_now(many, "vda", {})
    assert len(kept) == MAX_REMEMBERED and "cp0" not in kept and f"cp{MAX_REMEMBERED + 9}" in kept


def test_nothing_proving_the_birth_layer_means_no_trust() -> None:
    chain = [image("/top", "cp1"), image("/base", "cp1")]
    unproven = checkpoint("cp1", 100)
    assert lost_layers(chain, [unproven], "vda") == {"cp1": NO_BIRTH}
    # remembered where it was taken: judged as with libvirt's word
    assert lost_layers(chain, [unproven], "vda", births={"cp1": (100, "/base")}) == {}
    # that layer left without its bits: lost, as with libvirt's word
    assert (
        "left the chain"
        in lost_layers(
            [image("/top", "cp1"), image("/base")], [unproven], "vda", births={"cp1": (100, "/mid")}
        )["cp1"]
    )
    # not in the top: libvirt refuses it anyway, nothing is hidden
    assert lost_layers([image("/top"), image("/base", "cp1")], [unproven], "vda") == {}
