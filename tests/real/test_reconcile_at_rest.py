"""`virt-bitmapd reconcile` and `inspect` on real qcow2 chains, checked against the data.

Each scenario builds a chain the way libvirt leaves one (a checkpoint is a recording bitmap; an
external snapshot copies every recording bitmap into the new overlay), writes known blocks
through QEMU, commits with `qemu-img commit -d`, reconciles with the command line, and reads the
base's dirty extents back over NBD.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers.images import (
    K64,
    ChainBuilder,
    MiB,
    add_bitmap,
    bitmap_names,
    bitmaps,
    corrupt,
    create,
    dirty_extents,
    expected,
    leave_inconsistent,
    run,
    state,
    write,
)
from virt_bitmapd import images
from virt_bitmapd.errors import ImageMissing, TransactionRefused
from virt_bitmapd.model import BitmapMerge, Plan
from virt_bitmapd.planner import plan
from virt_bitmapd.transports.storage_daemon import apply_at_rest

pytestmark = pytest.mark.real

CLI = [sys.executable, "-m", "virt_bitmapd.cli"]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, check=False)


def reconcile(top: Path, base: Path, *extra: str) -> dict[str, object]:
    result = cli("reconcile", "--top", str(top), "--base", str(base), "--json", *extra)
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout))


def commit(top: Path, base: Path) -> None:
    """`qemu-img commit -d`: the data goes down, TOP is kept and still backs onto BASE."""
    run("qemu-img", "commit", "-q", "-d", "-b", str(base), str(top))


def three_layer_chain(tmp_path: Path) -> ChainBuilder:
    c = ChainBuilder(tmp_path)
    c.start()
    c.checkpoint("cp1")
    c.write(0, K64)
    c.snapshot("s1.qcow2")
    c.checkpoint("cp2")
    c.write(4 * MiB, 3 * K64)
    c.snapshot("s2.qcow2")
    c.checkpoint("cp3")
    c.write(8 * MiB + 4096, 4096)  # unaligned: the bitmap rounds to its granularity
    c.snapshot("active.qcow2")
    return c


def test_subchain_of_several_layers(tmp_path: Path) -> None:
    c = three_layer_chain(tmp_path)
    base, s1, s2 = c.layers[0], c.layers[1], c.layers[2]
    commit(s2, base)
    report = reconcile(s2, base)
    assert report["result"] == "reconciled"
    merges = {m["bitmap"]: m for m in report["plan"]["merges"]}  # type: ignore[index]
    assert merges["cp1"]["create_in_base"] is False  # already in BASE
    assert merges["cp2"]["create_in_base"] is True
    assert merges["cp3"]["create_in_base"] is True  # only in TOP
    assert merges["cp2"]["sources"] == [str(s2), str(s1)]
    assert merges["cp3"]["sources"] == [str(s2)]
    for name in ("cp1", "cp2", "cp3"):
        assert dirty_extents(base, name) == expected(c.recorded[name]), name
        flags = {str(b["name"]): b["flags"] for b in bitmaps(base)}
        assert flags[name] == ["auto"]


def test_base_above_older_layers_takes_their_copies_too(tmp_path: Path) -> None:
    # after a top commit the base is the disk's top: its one copy is what qemu-nbd exports
    c = three_layer_chain(tmp_path)
    oldest, s1, s2 = c.layers[0], c.layers[1], c.layers[2]
    commit(s2, s1)
    report = reconcile(s2, s1)
    merges = {m["bitmap"]: m for m in report["plan"]["merges"]}  # type: ignore[index]
    assert merges["cp1"]["sources"] == [str(s2), str(oldest)]
    assert merges["cp2"]["sources"] == [str(s2)] and merges["cp3"]["sources"] == [str(s2)]
    for name in ("cp1", "cp2", "cp3"):
        assert dirty_extents(s1, name) == expected(c.recorded[name]), name
    before = state(s1)
    assert reconcile(s2, s1)["result"] == "already consistent"
    assert state(s1) == before


def test_one_layer_commit_keeps_base_bits_and_second_run_is_already_consistent(
    tmp_path: Path,
) -> None:
    c = three_layer_chain(tmp_path)
    base, s1 = c.layers[0], c.layers[1]
    commit(s1, base)
    assert reconcile(s1, base)["result"] == "reconciled"
    # cp1 = BASE's own bits plus s1's; cp2 = s1's only
    assert dirty_extents(base, "cp1") == expected([(0, K64), (4 * MiB, 3 * K64)])
    assert dirty_extents(base, "cp2") == expected([(4 * MiB, 3 * K64)])
    assert "cp3" not in bitmap_names(base)
    before = state(base)
    assert reconcile(s1, base)["result"] == "already consistent"
    assert state(base) == before


def test_disabled_inconsistent_and_gapped_bitmaps_are_left_alone(tmp_path: Path) -> None:
    base = create(tmp_path / "base.qcow2")
    add_bitmap(base, "gapped")
    mid = create(tmp_path / "mid.qcow2", backing=base)  # lacks "gapped": a gap above the base
    top = create(tmp_path / "top.qcow2", backing=mid)
    add_bitmap(top, "crashed")
    leave_inconsistent(top, "crashed")  # marks every bitmap loaded then: add the others after
    add_bitmap(top, "gapped")
    add_bitmap(top, "off", disabled=True)
    add_bitmap(top, "good")
    write(top, 2 * MiB, K64)
    commit(top, base)
    before = state(base)
    report = reconcile(top, base)
    skipped = {s["bitmap"]: s["reason"] for s in report["plan"]["skipped"]}  # type: ignore[index]
    assert skipped == {
        "off": "disabled (not recording)",
        "crashed": "inconsistent (not saved cleanly)",
        "gapped": "gap in the bitmap's chain",
    }
    assert [m["bitmap"] for m in report["plan"]["merges"]] == ["good"]  # type: ignore[index]
    after = state(base)
    assert {k: v for k, v in after.items() if k != "good"} == before
    assert dirty_extents(base, "good") == expected([(2 * MiB, K64)])


def test_gap_below_the_base_only(tmp_path: Path) -> None:
    root = create(tmp_path / "root.qcow2")
    add_bitmap(root, "cp")
    run("qemu-img", "bitmap", "--disable", str(root), "cp")
    base = create(tmp_path / "base.qcow2", backing=root)
    top = create(tmp_path / "top.qcow2", backing=base)
    add_bitmap(top, "cp")
    write(top, 0, K64)
    commit(top, base)
    report = reconcile(top, base)
    assert report["result"] == "nothing to do"
    assert report["plan"]["skipped"][0]["image"] == str(root)  # type: ignore[index]
    assert "cp" not in bitmap_names(base)


def test_non_default_granularity_and_unusual_names(tmp_path: Path) -> None:
    names = ["checkpoint one", "sauvegarde-\u00e9t\u00e9 \u2603", "a,b"]
    c = ChainBuilder(tmp_path)
    base = c.start()
    c.snapshot("top.qcow2")
    for name in names:
        c.checkpoint(name, granularity=MiB)
    c.write(5 * MiB + 12345, 100)
    c.write(20 * MiB, 3 * MiB)
    top = c.active
    commit(top, base)
    reconcile(top, base)
    got = {str(b["name"]): b for b in bitmaps(base)}
    for name in names:
        assert got[name]["granularity"] == MiB
        assert dirty_extents(base, name) == expected(c.recorded[name], MiB)


def test_dry_run_changes_nothing(tmp_path: Path) -> None:
    c = three_layer_chain(tmp_path)
    base, s2 = c.layers[0], c.layers[2]
    commit(s2, base)
    before = state(base)
    report = reconcile(s2, base, "--dry-run")
    assert report["result"] == "planned"
    assert len(report["plan"]["merges"]) == 3  # type: ignore[index]
    assert state(base) == before


@pytest.mark.parametrize("holder", ["base", "top"])
def test_image_held_open_is_refused(tmp_path: Path, holder: str) -> None:
    c = three_layer_chain(tmp_path)
    base, s1 = c.layers[0], c.layers[1]
    commit(s1, base)
    held = base if holder == "base" else s1
    before = state(base)
    # An interactive qemu-io holds the image read-write, as a running VM does, until "quit".
    writer = subprocess.Popen(
        ["qemu-io", "-f", "qcow2", str(held)],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        # inspect still reads an image in use, and says so: wait until qemu-io holds it
        deadline = time.monotonic() + 10
        while not json.loads(cli("inspect", "--json", str(held)).stdout)["open_elsewhere"]:
            assert time.monotonic() < deadline, "qemu-io never took the image's lock"
            time.sleep(0.05)
        result = cli("reconcile", "--top", str(s1), "--base", str(base))
        assert result.returncode == 1
        assert "in use by another process" in result.stderr
        assert str(held) in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    finally:
        writer.communicate(b"quit\n", timeout=30)
    assert state(base) == before


def test_raw_base_is_refused(tmp_path: Path) -> None:
    base = create(tmp_path / "base.raw", fmt="raw", size="16M")
    top = create(tmp_path / "top.qcow2", backing=base)
    add_bitmap(top, "cp")
    write(top, 0, K64)
    result = cli("reconcile", "--top", str(top), "--base", str(base))
    assert result.returncode == 1
    assert f"{base}: the commit base is raw, not qcow2" in result.stderr


def test_missing_backing_file_is_named(tmp_path: Path) -> None:
    gone = tmp_path / "gone.qcow2"
    top = tmp_path / "top.qcow2"
    run(
        "qemu-img",
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-b",
        str(gone),
        "-F",
        "qcow2",
        str(top),
        "16M",
    )
    for command in (["inspect", str(top)], ["reconcile", "--top", str(top), "--base", str(gone)]):
        result = cli(*command)
        assert result.returncode == 1
        assert str(gone) in result.stderr and "No such file" in result.stderr
    with pytest.raises(ImageMissing):
        images.read_chain(str(top))


def test_corrupt_image_is_named(tmp_path: Path) -> None:
    base = create(tmp_path / "base.qcow2")
    top = create(tmp_path / "top.qcow2", backing=base)
    corrupt(base)
    result = cli("reconcile", "--top", str(top), "--base", str(base), "--json")
    assert result.returncode == 1
    error = json.loads(result.stdout)["error"]
    assert error["kind"] == "image_corrupt" and error["image"] == str(base)


def test_base_not_in_chain_and_outside_storage_roots(tmp_path: Path) -> None:
    c = three_layer_chain(tmp_path)
    base, s1 = c.layers[0], c.layers[1]
    other = create(tmp_path / "other.qcow2")
    result = cli("reconcile", "--top", str(s1), "--base", str(other))
    assert result.returncode == 1 and "is not below" in result.stderr
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    before = state(base)
    result = cli("reconcile", "--top", str(s1), "--base", str(base), "--storage-root", str(allowed))
    assert result.returncode == 1 and "outside the storage roots" in result.stderr
    assert state(base) == before
    ok = cli("reconcile", "--top", str(s1), "--base", str(base), "--storage-root", str(tmp_path))
    assert ok.returncode == 0, ok.stderr


def test_config_file_storage_roots_apply_to_reconcile(tmp_path: Path) -> None:
    c = three_layer_chain(tmp_path)
    base, s1 = c.layers[0], c.layers[1]
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    config = tmp_path / "config.toml"
    config.write_text(f'[storage]\nroots = ["{allowed}"]\n')
    before = state(base)
    result = cli("reconcile", "--top", str(s1), "--base", str(base), "--config", str(config))
    assert result.returncode == 1 and "outside the storage roots" in result.stderr
    assert str(base) in result.stderr
    assert state(base) == before
    # The flag overrides the file, as for `run`.
    ok = cli(
        "reconcile", "--top", str(s1), "--base", str(base), "--config", str(config),
        "--storage-root", str(tmp_path),
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    missing = cli("reconcile", "--top", str(s1), "--base", str(base), "--config", "/nonexistent")
    assert missing.returncode == 2 and "/nonexistent: no such file" in missing.stderr


def test_source_that_cannot_be_opened_leaves_base_unchanged(tmp_path: Path) -> None:
    c = three_layer_chain(tmp_path)
    base, s1, s2 = c.layers[0], c.layers[1], c.layers[2]
    commit(s2, base)
    the_plan = plan(images.read_chain(str(s2)), str(s2), str(base))
    before = state(base)
    s1.write_bytes(b"not an image any more")  # a source vanishes into garbage after planning
    with pytest.raises(Exception, match=str(s1)):
        apply_at_rest(the_plan)
    assert state(base) == before


def test_transaction_is_all_or_nothing(tmp_path: Path) -> None:
    c = three_layer_chain(tmp_path)
    base, s1 = c.layers[0], c.layers[1]
    commit(s1, base)
    before = state(base)
    # The first merge is fine; the second names a bitmap the source does not hold.
    bad = Plan(
        top=str(s1),
        base=str(base),
        merges=(
            BitmapMerge(bitmap="cp2", granularity=K64, create_in_base=True, sources=(str(s1),)),
            BitmapMerge(bitmap="nope", granularity=K64, create_in_base=True, sources=(str(s1),)),
        ),
    )
    with pytest.raises(TransactionRefused, match="nothing was changed"):
        apply_at_rest(bad)
    assert state(base) == before


def test_inspect_reports_validity(tmp_path: Path) -> None:
    c = three_layer_chain(tmp_path)
    run("qemu-img", "bitmap", "--disable", str(c.layers[1]), "cp1")
    result = cli("inspect", "--json", str(c.active))
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert [i["path"] for i in document["images"]] == [str(p) for p in reversed(c.layers)]
    assert document["bitmaps"]["cp3"] == {"valid": True}
    top_bitmaps = {b["name"]: b for b in document["images"][0]["bitmaps"]}
    assert top_bitmaps["cp3"]["chain_valid"] is True and top_bitmaps["cp1"]["chain_valid"] is False
    assert top_bitmaps["cp1"]["recording"] is True and top_bitmaps["cp1"]["inconsistent"] is False
    assert document["bitmaps"]["cp1"] == {
        "valid": False,
        "reason": "disabled (not recording)",
        "image": str(c.layers[1]),
    }
    text = cli("inspect", str(c.active)).stdout
    assert "'cp2': valid" in text and "'cp1': INVALID" in text


def test_reconcile_loads_nothing_of_the_service(tmp_path: Path) -> None:
    """The command a cold-merge tool runs once per merge starts light: no daemon, no asyncio
    event machinery of libvirt's, no prometheus_client."""
    c = three_layer_chain(tmp_path)
    base, s1 = c.layers[0], c.layers[1]
    commit(s1, base)
    program = (
        "import json, sys\n"
        "from virt_bitmapd.cli import main\n"
        f"code = main(['reconcile', '--top', {str(s1)!r}, '--base', {str(base)!r}, "
        f"'--storage-root', {str(tmp_path)!r}])\n"
        "print(json.dumps([code, sorted(sys.modules)]))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, check=True
    )
    code, modules = json.loads(result.stdout.splitlines()[-1])
    assert code == 0, result.stdout
    assert "virt_bitmapd.reconcile" in modules  # it did run
    loaded = [
        name
        for name in modules
        if name.startswith(("virt_bitmapd.service", "virt_bitmapd.look", "prometheus_client"))
        or name in ("libvirtaio", "virt_bitmapd.observability.metrics", "asyncio")
    ]
    assert loaded == [], loaded
