"""The chain most daemon tests use, and what its base must hold after a commit."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import libvirt

from helpers.images import (
    K64,
    ChainBuilder,
    MiB,
    bitmaps,
    create,
    dirty_extents,
    expected,
    run,
)
from helpers.libvirt_env import Domains, stop_gracefully, virsh


def build(folder: Path) -> ChainBuilder:
    """base (cp1) <- s1 (cp1, cp2) <- active (cp1, cp2, cp3), known writes in each."""
    folder.mkdir(parents=True, exist_ok=True)
    c = ChainBuilder(folder)
    c.start()
    c.checkpoint("cp1")
    c.write(0, K64)
    c.snapshot("s1.qcow2")
    c.checkpoint("cp2")
    c.write(2 * MiB, 2 * K64, 0xBB)
    c.snapshot("active.qcow2")
    c.checkpoint("cp3")
    c.write(9 * MiB, K64, 0xCC)
    return c


def tracked(
    tmp_path: Path,
    domains: Domains,
    daemon_factory: Any,
    *extra: str,
    running: bool,
    **daemon: Any,
) -> tuple[ChainBuilder, Any, Any]:
    """The usual start: the test chain, a domain on it, a daemon (with ``extra`` arguments)
    that has seen its disk."""
    c = build(tmp_path / "images")
    dom = domains.define(c.active, start=running)
    process = daemon_factory(**daemon).start(*extra)
    process.wait_for(is_for(dom, "disk_tracked"), what="disk tracked")
    return c, dom, process


def commit_s1_live(dom: Any, c: ChainBuilder, *options: str) -> None:
    """libvirt's non-active commit of s1 into the base, on the running domain."""
    top, base = str(c.layers[1]), str(c.layers[0])
    virsh("blockcommit", dom.name(), "vda", "--top", top, "--base", base, "--wait", *options)


def commit_offline(c: ChainBuilder) -> None:
    """oVirt-style cold merge of s1 into base: qemu-img commit, then rebase its child."""
    base, s1, active = c.layers
    run("qemu-img", "commit", "-q", str(s1))
    run("qemu-img", "rebase", "-u", "-b", str(base), "-F", "qcow2", str(active))


def base_bitmaps(c: ChainBuilder) -> dict[str, Any]:
    return {str(b["name"]): (b["granularity"], b["flags"]) for b in bitmaps(c.layers[0])}


def assert_base_holds_the_data(c: ChainBuilder) -> None:
    base = c.layers[0]
    # cp1 saw every write; cp2 those from s1 on; cp3 is only in the active layer, not committed
    assert dirty_extents(base, "cp1") == expected([(0, K64), (2 * MiB, 2 * K64)])
    assert dirty_extents(base, "cp2") == expected([(2 * MiB, 2 * K64)])
    flags = base_bitmaps(c)
    assert flags["cp1"] == (K64, ["auto"]) and flags["cp2"] == (K64, ["auto"])


def is_for(dom: Any, event: str, **fields: Any) -> Any:
    def match(entry: dict[str, Any]) -> bool:
        return (
            entry.get("event") == event
            and entry.get("domain") == dom.name()
            and all(entry.get(k) == v for k, v in fields.items())
        )

    return match


def entry_after(
    daemon: Any, mark: int, predicate: Any, what: str, timeout: float = 30
) -> dict[str, Any]:
    """The first of the daemon's log entries after entry number ``mark`` that matches."""
    deadline = time.monotonic() + timeout
    while True:
        found: list[dict[str, Any]] = [e for e in daemon.entries()[mark:] if predicate(e)]
        if found:
            return found[0]
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.1)


def rescan_now(daemon: Any, what: str) -> None:
    """SIGHUP, then wait until every look that rescan asked for has been taken."""
    mark = len(daemon.entries())
    daemon.signal(signal.SIGHUP)
    entry_after(
        daemon,
        mark,
        lambda e: e.get("event") == "rescan_finished" and e["trigger"] == "manual",
        what,
    )


def guest_write(dom: Any, offset: int, length: int, pattern: int) -> None:
    """A write as the guest's disk device makes it: every recording bitmap of the active layer
    marks it."""
    device = "/machine/peripheral/virtio-disk0/virtio-backend"
    command = f'qemu-io -d {device} "write -P {pattern} {offset} {length}"'
    out = virsh("qemu-monitor-command", dom.name(), "--hmp", command)
    assert "error" not in out.lower(), out


def snapshot(dom: Any, overlay: Path, *options: str) -> None:
    """A disk-only external snapshot of vda onto ``overlay``, as a backup tool or person takes
    one (libvirt sends no event for it)."""
    virsh(
        "snapshot-create-as", dom.name(), "--disk-only", "--no-metadata", *options,
        "--diskspec", f"vda,file={overlay}",
    )  # fmt: skip


def checkpoint_status(daemon: Any, domain: str) -> dict[str, dict[str, Any]]:
    """`virt-bitmapd status DOMAIN --json`, as checkpoint -> its entry (vda's)."""
    command = ["status", domain, "--json", "--config", str(daemon.config)]
    result = subprocess.run(
        [sys.executable, "-m", "virt_bitmapd.cli", *command],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    (found,) = json.loads(result.stdout)["domains"]
    (disk,) = found["disks"]
    return {entry["checkpoint"] or entry["bitmap"]: entry for entry in disk["checkpoints"]}


def redefine_on(domains: Domains, dom: Any, image: Path) -> Any:
    """The (shut-off) domain defined again with vda on ``image`` alone: libvirt reads the rest
    of the chain from the headers."""
    xml = dom.XMLDesc(0)
    start, end = xml.index("<disk "), xml.index("</disk>") + len("</disk>")
    disk = (
        "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
        f"<source file='{image}'/><target dev='vda' bus='virtio'/></disk>"
    )
    return domains.conn.defineXML(xml[:start] + disk + xml[end:])


def running_on_new_image(
    tmp_path: Path,
    domains: Domains,
    daemon_factory: Any,
    name: str,
    options: tuple[str, ...] = (),
    **settings: Any,
) -> tuple[Path, Path, Any, Any]:
    """A new image ``name`` in a folder of its own (the storage root), a running domain on it
    and a daemon (watching for snapshots each second, started with ``options`` too) that has
    seen its disk.  Returns the folder, the image, the domain and the daemon."""
    folder = tmp_path / "images"
    folder.mkdir()
    image = folder / name
    create(image)
    dom = domains.define(image, start=True)
    daemon = daemon_factory(roots=[folder], **settings).start(
        "--snapshot-watch-interval", "1", *options
    )
    daemon.wait_for(is_for(dom, "disk_tracked"), what="disk tracked")
    return folder, image, dom, daemon


def cp1_lost_at_rest(
    tmp_path: Path, domains: Domains, daemon: Any, options: tuple[str, ...] = ()
) -> tuple[Any, Path]:
    """cp1 taken on a new base, written into base and into an overlay s1, seen by the daemon
    (started with ``options``); then, the domain shut off and the daemon stopped, s1 committed
    into base by a tool that carries no bitmap, and deleted: nothing holds what was written in
    s1 since cp1.  Returns the shut-off domain (on base again) and base."""
    folder = tmp_path / "images"
    folder.mkdir()
    base, s1 = create(folder / "base.qcow2"), folder / "s1.qcow2"
    dom = domains.define(base, start=True)
    daemon.start(*options)
    daemon.wait_for(is_for(dom, "disk_tracked"), what="disk tracked")
    virsh("checkpoint-create-as", dom.name(), "cp1", "--diskspec", "vda")
    guest_write(dom, 1 * MiB, K64, 0x11)
    snapshot(dom, s1)
    daemon.wait_for(is_for(dom, "chain_changed"), what="the snapshot seen")
    guest_write(dom, 3 * MiB, K64, 0x22)  # into s1: recorded by cp1's copy there only
    return merged_while_down(domains, dom, daemon, base, s1), base


def merged_while_down(domains: Domains, dom: Any, daemon: Any, base: Path, top: Path) -> Any:
    """The domain shut off and the daemon stopped (its state holds ``top`` on ``base``), then
    ``top`` committed into ``base`` by a tool that carries no bitmap, the domain moved down to
    ``base`` and ``top`` deleted: what ``top`` held since its checkpoints is proved nowhere.
    Returns the (shut-off) domain."""
    stop_gracefully(dom)
    assert daemon.stop() == 0
    run("qemu-img", "commit", "-q", "-d", "-b", str(base), str(top))
    dom = redefine_on(domains, dom, base)
    top.unlink()
    return dom


def redefine_checkpoint(dom: Any, folder: Path, name: str, created: int, domain: str = "") -> None:
    """libvirt's checkpoint ``name`` of vda defined anew (metadata only), with ``domain`` (the
    domain's XML as the checkpoint saw it) or, as oVirt redefines them, without it."""
    with contextlib.suppress(libvirt.libvirtError):
        dom.checkpointLookupByName(name).delete(libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)
    xml = (
        f"<domaincheckpoint><name>{name}</name><creationTime>{created}</creationTime>"
        f"<disks><disk name='vda' checkpoint='bitmap' bitmap='{name}'/></disks>"
        f"{domain}</domaincheckpoint>"
    )
    path = folder / f"{name}.xml"
    path.write_text(xml)
    virsh("checkpoint-create", dom.name(), str(path), "--redefine")
