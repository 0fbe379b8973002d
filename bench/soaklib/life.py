"""One domain's life: what can happen to its disk, driven through virsh and QEMU's tools, with
the ground truth kept beside it (``content``).  Every operation leaves the domain running."""

from __future__ import annotations

import json
import random
import signal
import time
import uuid
from pathlib import Path

from . import checks
from .checks import Figures
from .content import Content
from .oracle import end_backup
from .tools import REPO, SNAPSHOT_WATCH, Daemon, blocks, run, virsh

DISK = 64 * 1024 * 1024
MAX_CHECKPOINTS = 4
#: The events after which every checkpoint is backed up by both readers.
COMMITS = (
    "live_commit",
    "active_commit",
    "cold_merge",
    "cold_merge_deleted",
    "cold_merge_killed",
    "revert",
    "block_copy",
)


class Life:
    def __init__(self, folder: Path, daemon: Daemon | None, figures: Figures) -> None:
        self.folder = folder
        self.daemon = daemon
        self.figures = figures
        self.name = f"vbd-soak-{folder.name}-{random.randrange(1 << 24):06x}"
        self.uuid = str(uuid.uuid4())
        base = folder / "base.qcow2"
        run("qemu-img", "create", "-q", "-f", "qcow2", str(base), str(DISK))
        self.chain = [base]  # top first
        self.content = Content()
        self.made = 0
        #: checkpoint -> what every block read when it was taken
        self.taken_at: dict[str, dict[int, int]] = {}
        self.taken = 0
        self.define()
        virsh("start", self.name)

    def define(self) -> None:
        kind = "kvm" if Path("/dev/kvm").exists() else "qemu"
        xml = self.folder / "domain.xml"
        xml.write_text(
            f"<domain type='{kind}'><name>{self.name}</name><uuid>{self.uuid}</uuid>"
            "<memory unit='MiB'>64</memory>"
            "<vcpu>1</vcpu><os><type arch='x86_64' machine='pc'>hvm</type></os><devices>"
            "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
            f"<source file='{self.chain[0]}'/><target dev='vda' bus='virtio'/></disk>"
            "</devices></domain>"
        )
        virsh("define", str(xml))

    def remove(self) -> None:
        virsh("destroy", self.name, check=False)
        virsh("undefine", self.name, "--checkpoints-metadata", check=False)
        if self.daemon is not None:
            for entry in self.daemon.entries():
                if entry.get("event") == "reconciliation" and entry.get("domain") == self.name:
                    result = str(entry.get("result"))
                    self.figures.results[result] = self.figures.results.get(result, 0) + 1

    def do(self, kind: str, number: int) -> None:
        getattr(self, kind)(number)
        self.figures.done[kind] = self.figures.done.get(kind, 0) + 1
        if kind in COMMITS:
            self.figures.commits += 1
            checks.back_up_online(self)

    # ------------------------------------------------------------ what happens

    def write(self, number: int) -> None:
        offset = (number % (DISK // 4096 - 64)) * 4096
        length = 4096 * (1 + number % 40)
        device = "/machine/peripheral/virtio-disk0/virtio-backend"
        command = f'qemu-io -d {device} "write -P {number % 251} {offset} {length}"'
        said = virsh("qemu-monitor-command", self.name, "--hmp", command).stdout
        if "error" in said.lower():
            raise RuntimeError(f"guest write failed: {said}")
        self.content.write(blocks(offset, length))

    def checkpoint(self, _: int) -> None:
        while len(self.taken_at) >= MAX_CHECKPOINTS:  # a backup tool keeps a few
            self.forget(next(iter(self.taken_at)))
        self.taken += 1
        name = f"cp{self.taken}"
        virsh("checkpoint-create-as", self.name, name, "--diskspec", "vda")
        self.taken_at[name] = self.content.read()

    def snapshot(self, _: int) -> None:
        self.mark()
        self.made += 1
        overlay = self.folder / f"s{self.made}.qcow2"
        virsh(
            "snapshot-create-as", self.name, "--disk-only", "--no-metadata",
            "--diskspec", f"vda,file={overlay}",
        )  # fmt: skip
        self.chain.insert(0, overlay)
        self.content.snapshot()
        if self.daemon is not None:  # a snapshot lives a little while before it is merged
            self.daemon.wait_for("chain_changed", timeout=10 * SNAPSHOT_WATCH + 10)

    def live_commit(self, _: int) -> None:
        self.mark()
        top, base = self.chain[1], self.chain[2]
        virsh("blockcommit", self.name, "vda", "--top", str(top), "--base", str(base), "--wait")
        self.chain.remove(top)
        self.content.commit(1)
        self.settle()

    def active_commit(self, _: int) -> None:
        self.mark()
        base = str(self.chain[1])  # without --base, virsh commits the whole chain
        virsh("blockcommit", self.name, "vda", "--active", "--pivot", "--base", base, "--wait")
        self.chain.pop(0)
        self.content.commit(0)
        self.settle()

    def cold_merge(self, number: int) -> None:
        """oVirt's way, while the domain is shut off: `qemu-img commit` of one layer into the
        one below it, its child rebased, the domain defined on what is left."""
        self.merge_at_rest(number)

    def cold_merge_deleted(self, number: int) -> None:
        """The same by a tool that deletes the committed file at once, before anyone could
        read its bitmaps: what it held cannot be proven in the base any more."""
        self.merge_at_rest(number, delete=True)

    def cold_merge_killed(self, number: int) -> None:
        """A cold merge, and the daemon killed (SIGKILL) while it reconciles it at rest."""
        self.merge_at_rest(number, kill_after=(number % 300) / 1000)

    def merge_at_rest(
        self, number: int, *, delete: bool = False, kill_after: float | None = None
    ) -> None:
        self.stop()
        index = number % (len(self.chain) - 1)
        layer, below = self.chain[index], self.chain[index + 1]
        self.mark()
        run("qemu-img", "commit", "-q", "-d", "-b", str(below), str(layer))
        if index > 0:
            child = self.chain[index - 1]
            run("qemu-img", "rebase", "-q", "-u", "-b", str(below), "-F", "qcow2", str(child))
        self.chain.remove(layer)
        self.content.commit(index)
        self.define()
        if delete:
            layer.unlink()
        if self.daemon is not None:
            self.daemon.signal(signal.SIGHUP)
            if kill_after is None:
                self.settle()
            else:  # killed before or after it logged the reconciliation: its successor looks
                time.sleep(kill_after)
                self.restart_daemon(signal.SIGKILL)
                self.daemon.wait_for_rescan()
        checks.back_up_offline(self)
        virsh("start", self.name)

    def revert(self, _: int) -> None:
        """The disk pointed back at the layer below its top, shut off: the top is discarded
        (its file left), and every block it held reads as before it was made."""
        self.stop()
        self.mark()
        self.chain.pop(0)
        self.content.discard_top()
        self.define()
        self.settle()
        checks.back_up_offline(self)
        virsh("start", self.name)

    def block_copy(self, number: int) -> None:
        """A full block copy with pivot (the chain flattened into a new image), the domain
        then defined on it; every other time with the daemon stopped meanwhile."""
        down = number % 2 == 1 and self.daemon is not None
        if down:
            assert self.daemon is not None
            self.daemon.stop()
        self.mark()
        self.made += 1
        copy = self.folder / f"s{self.made}.qcow2"
        virsh(
            "blockcopy", self.name, "vda", str(copy), "--format", "qcow2",
            "--wait", "--pivot", "--transient-job",
        )  # fmt: skip
        self.chain = [copy]
        self.content.flatten()
        self.define()
        if self.daemon is not None:
            if down:
                self.daemon.start()
            self.daemon.wait_for_rescan()

    def reenable(self, number: int) -> None:
        """Someone makes a quarantined (disabled) checkpoint bitmap record again in the
        running domain's QEMU; the daemon's next look (a SIGHUP rescan here) must undo it."""
        query = json.dumps({"execute": "query-block"})
        said = json.loads(virsh("qemu-monitor-command", self.name, query).stdout)["return"]
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
        virsh("qemu-monitor-command", self.name, json.dumps(command))
        if self.daemon is not None:
            self.daemon.wait_for_rescan()

    def backup_held(self, _: int) -> None:
        """A full pull-mode backup held open while the daemon looks at every disk: no health
        warning may be logged for a disk whose backup job runs."""
        folder = self.folder / "held"
        folder.mkdir(exist_ok=True)
        description = folder / "backup.xml"
        description.write_text(
            "<domainbackup mode='pull'>"
            f"<server transport='unix' socket='{folder / 'b.sock'}'/><disks>"
            f"<disk name='vda' backup='yes' type='file'><scratch file='{folder / 's.qcow2'}'/>"
            "</disk></disks></domainbackup>"
        )
        virsh("backup-begin", self.name, str(description))
        try:
            if self.daemon is not None:
                mark = len(self.daemon.entries())
                self.daemon.wait_for_rescan()
                self.figures.job_warnings += sum(
                    1
                    for entry in self.daemon.entries()[mark:]
                    if entry.get("event") == "checkpoint_health" and entry.get("level") == "warning"
                )
        finally:
            end_backup(self.name)

    def stop_start(self, _: int) -> None:
        self.stop()
        checks.back_up_offline(self)
        virsh("start", self.name)

    def stop(self) -> None:
        """SIGTERM to QEMU: it closes its images cleanly, storing the bitmaps."""
        virsh("destroy", self.name, "--graceful")

    def daemon_term(self, _: int) -> None:
        self.restart_daemon(signal.SIGTERM)

    def daemon_kill(self, _: int) -> None:
        self.restart_daemon(signal.SIGKILL)

    def restart_daemon(self, signum: int) -> None:
        if self.daemon is not None:
            self.daemon.stop(signum)
            self.daemon.start()

    def libvirtd_restart(self, _: int) -> None:
        run("pkill", "-KILL", "-x", "libvirtd")
        time.sleep(0.5)
        run(str(REPO / "scripts" / "libvirt-up.sh"))
        deadline = time.monotonic() + 60  # libvirtd reattaches to the running QEMU after start
        status = '{"execute": "query-status"}'
        while virsh("qemu-monitor-command", self.name, status, check=False).returncode != 0:
            if time.monotonic() > deadline:
                raise RuntimeError(f"libvirtd did not reattach to {self.name} within 60 s")
            time.sleep(0.2)
        if self.daemon is not None:
            self.daemon.wait_for("libvirt_connected")

    # ------------------------------------------------------------ the oracles

    def mark(self) -> None:
        if self.daemon is not None:
            self.daemon.mark()

    def settle(self) -> None:
        """With the daemon: until it has logged the commit's reconciliation."""
        if self.daemon is not None:
            self.daemon.wait_for("reconciliation")

    def forget(self, name: str) -> None:
        """Delete checkpoint ``name``, with its bitmaps; only its metadata when libvirt finds
        no bitmap to delete."""
        if virsh("checkpoint-delete", self.name, name, check=False).returncode != 0:
            virsh("checkpoint-delete", self.name, name, "--metadata")
        del self.taken_at[name]
