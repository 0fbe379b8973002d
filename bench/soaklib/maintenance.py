"""What is done to a domain's disk beside its guest's writes and libvirt's jobs: cold merges
(by a tool that deletes the committed file, that runs `virt-bitmapd reconcile` first, or while
the daemon is killed), reverts, overlays without bitmaps healed by hand, block copies, bitmaps
re-enabled by hand, backup jobs held open.  Each leaves the domain running."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from .checks import back_up_offline
from .oracle import end_backup
from .tools import VBD, run, virsh

if TYPE_CHECKING:
    from .life import Life


def cold_merge(life: Life, number: int) -> None:
    """oVirt's way, while the domain is shut off: `qemu-img commit` of one layer into the
    one below it, its child rebased, the domain defined on what is left."""
    merge_at_rest(life, number)


def cold_merge_deleted(life: Life, number: int) -> None:
    """The same by a tool that deletes the committed file at once, before anyone could
    read its bitmaps: what it held cannot be proven in the base any more."""
    merge_at_rest(life, number, delete=True)


def cold_merge_reconciled(life: Life, number: int) -> None:
    """A tool that runs `virt-bitmapd reconcile` after its `qemu-img commit`, then deletes
    the committed file at once (as it may once the command exits 0)."""
    merge_at_rest(life, number, delete=True, reconcile=True)


def cold_merge_killed(life: Life, number: int) -> None:
    """A cold merge, and the daemon killed (SIGKILL) while it reconciles it at rest."""
    merge_at_rest(life, number, kill_after=(number % 300) / 1000)


def merge_at_rest(
    life: Life,
    number: int,
    *,
    delete: bool = False,
    kill_after: float | None = None,
    reconcile: bool = False,
) -> None:
    life.stop()
    index = number % (len(life.chain) - 1)
    layer, below = life.chain[index], life.chain[index + 1]
    life.mark()
    run("qemu-img", "commit", "-q", "-d", "-b", str(below), str(layer))
    if reconcile and life.daemon is not None:
        config = str(life.daemon.config)
        run(*VBD, "reconcile", "--top", str(layer), "--base", str(below), "--config", config)
    if index > 0:
        child = life.chain[index - 1]
        run("qemu-img", "rebase", "-q", "-u", "-b", str(below), "-F", "qcow2", str(child))
    life.chain.remove(layer)
    life.content.commit(index)
    life.define()
    if delete:
        layer.unlink()
        life.freed.append(layer)
    if life.daemon is not None:
        life.daemon.signal(signal.SIGHUP)
        if kill_after is None:
            life.settle()
        else:  # killed before or after it logged the reconciliation: its successor looks
            time.sleep(kill_after)
            life.restart_daemon(signal.SIGKILL)
            life.daemon.wait_for_rescan()
    back_up_offline(life)
    virsh("start", life.name)


def revert(life: Life, _: int) -> None:
    """The disk pointed back at the layer below its top, shut off: the top is discarded
    (its file left), and every block it held reads as before it was made."""
    life.stop()
    life.mark()
    life.chain.pop(0)
    life.content.discard_top()
    life.define()
    life.settle()
    back_up_offline(life)
    virsh("start", life.name)


def heal_by_hand(life: Life, number: int) -> None:
    """Shut off, an overlay made with `qemu-img create` (it copies no bitmap: every
    checkpoint's chain is broken), the domain defined on it; then, with the daemon,
    `virt-bitmapd heal` run by hand, which rebuilds each bitmap in the overlay from what
    the overlay allocates, or refuses."""
    life.stop()
    life.mark()
    overlay = life.new_layer(number)
    below = life.chain[0]
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", str(below), "-F", "qcow2", str(overlay))
    life.chain.insert(0, overlay)
    life.content.snapshot()
    life.define()
    if life.daemon is not None:
        life.daemon.wait_for_rescan()
        healed = run(*VBD, "heal", str(overlay), "--config", str(life.daemon.config), check=False)
        outcome = "healed" if healed.returncode == 0 else "refused"
        life.figures.heals[outcome] = life.figures.heals.get(outcome, 0) + 1
        life.daemon.wait_for_rescan()
    back_up_offline(life)
    virsh("start", life.name)


def block_copy(life: Life, number: int) -> None:
    """A full block copy with pivot (the chain flattened into a new image), the domain
    then defined on it; every other time with the daemon stopped meanwhile."""
    down = number % 2 == 1 and life.daemon is not None
    if down:
        assert life.daemon is not None
        life.daemon.stop()
    life.mark()
    copy = life.new_layer(number + 1)
    virsh(
        "blockcopy", life.name, "vda", str(copy), "--format", "qcow2",
        "--wait", "--pivot", "--transient-job",
    )  # fmt: skip
    life.chain = [copy]
    life.content.flatten()
    life.define()
    if life.daemon is not None:
        if down:
            life.daemon.start()
        life.daemon.wait_for_rescan()


def reenable(life: Life, number: int) -> None:
    """Someone makes a quarantined (disabled) checkpoint bitmap record again in the
    running domain's QEMU; the daemon's next look (a SIGHUP rescan here) must undo it."""
    query = json.dumps({"execute": "query-block"})
    said = json.loads(virsh("qemu-monitor-command", life.name, query).stdout)["return"]
    inserted = said[0]["inserted"]
    disabled = sorted(
        b["name"] for b in inserted.get("dirty-bitmaps", []) if not b.get("recording")
    )
    if not disabled:
        return
    name = disabled[number % len(disabled)]
    command = {
        "execute": "block-dirty-bitmap-enable",
        "arguments": {"node": inserted["node-name"], "name": name},
    }
    virsh("qemu-monitor-command", life.name, json.dumps(command))
    if life.daemon is not None:
        life.daemon.wait_for_rescan()


def backup_held(life: Life, _: int) -> None:
    """A full pull-mode backup held open while the daemon looks at every disk: no health
    warning may be logged for a disk whose backup job runs."""
    folder = life.folder / "held"
    folder.mkdir(exist_ok=True)
    description = folder / "backup.xml"
    description.write_text(
        "<domainbackup mode='pull'>"
        f"<server transport='unix' socket='{folder / 'b.sock'}'/><disks>"
        f"<disk name='vda' backup='yes' type='file'><scratch file='{folder / 's.qcow2'}'/>"
        "</disk></disks></domainbackup>"
    )
    virsh("backup-begin", life.name, str(description))
    try:
        if life.daemon is not None:
            mark = len(life.daemon.entries())
            life.daemon.wait_for_rescan()
            life.figures.job_warnings += sum(
                1
                for entry in life.daemon.entries()[mark:]
                if entry.get("event") == "checkpoint_health" and entry.get("level") == "warning"
            )
    finally:
        end_backup(life.name)


#: Each operation by its name in the soak's weights.
MAINTENANCE: dict[str, Callable[[Life, int], None]] = {
    "cold_merge": cold_merge,
    "cold_merge_deleted": cold_merge_deleted,
    "cold_merge_reconciled": cold_merge_reconciled,
    "cold_merge_killed": cold_merge_killed,
    "revert": revert,
    "heal_by_hand": heal_by_hand,
    "block_copy": block_copy,
    "reenable": reenable,
    "backup_held": backup_held,
}
