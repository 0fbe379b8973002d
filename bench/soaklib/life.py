"""One domain's life: what can happen to its disk, driven through virsh and QEMU's tools, with
the ground truth kept beside it (``content``).  Every operation leaves the domain running."""

from __future__ import annotations

import random
import signal
import time
import uuid
from pathlib import Path

from . import checks
from .checks import Figures
from .content import Content
from .maintenance import MAINTENANCE
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
    "cold_merge_reconciled",
    "heal_by_hand",
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
        #: paths of layers deleted, for new layers to reuse
        self.freed: list[Path] = []
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
        Path("/var/log/libvirt/qemu", f"{self.name}.log").unlink(missing_ok=True)
        if self.daemon is not None:
            for entry in self.daemon.entries():
                if entry.get("event") == "reconciliation" and entry.get("domain") == self.name:
                    result = str(entry.get("result"))
                    self.figures.results[result] = self.figures.results.get(result, 0) + 1
                    if result == "unproven":
                        why = str(entry.get("error", "")).replace(f"{self.folder}/", "")
                        self.figures.unproven.append(why)

    def do(self, kind: str, number: int) -> None:
        operation = MAINTENANCE.get(kind)
        if operation is None:
            getattr(self, kind)(number)
        else:
            operation(self, number)
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

    def snapshot(self, number: int) -> None:
        self.mark()
        overlay = self.new_layer(number)
        virsh(
            "snapshot-create-as", self.name, "--disk-only", "--no-metadata",
            "--diskspec", f"vda,file={overlay}",
        )  # fmt: skip
        self.chain.insert(0, overlay)
        self.content.snapshot()
        if self.daemon is not None:  # a snapshot lives a little while before it is merged
            self.daemon.wait_for("chain_changed", timeout=10 * SNAPSHOT_WATCH + 10)

    def new_layer(self, number: int) -> Path:
        """A path for a new layer: every other time one a deleted layer had (tools reuse
        names), else a new one."""
        if self.freed and number % 2 == 0:
            return self.freed.pop(0)
        self.made += 1
        return self.folder / f"s{self.made}.qcow2"

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
