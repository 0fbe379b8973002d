"""Soak: random lives of a VM's disk, judged by libvirt's own incremental backups.

One OS-less domain lives through a seeded random sequence of what happens on a host: libvirt
checkpoints, guest writes (through QEMU's device backend, so the recording bitmaps mark them as a
guest's), external disk-only snapshots, live commits, active commits with pivot, cold merges done
with `qemu-img commit` while the domain is shut off (as oVirt does), stops and starts, daemon
restarts (SIGTERM and SIGKILL) and libvirtd restarts.  After every commit, each checkpoint is
backed up the way a backup tool does it: a pull-mode `virsh backup-begin` incremental from it,
whose exported dirty bitmap is read back over NBD and compared with the blocks written since the
checkpoint was taken.  A block written and not in the backup is *missed*.  A refused backup is
counted, and foreseen when `virt-bitmapd status` showed the checkpoint quarantined (untrusted),
or missing or broken (its bitmap went with a file deleted before its bits could be carried);
the backup tool then deletes the checkpoint (it takes a full backup instead).

The same sequence runs twice: with `virt-bitmapd run`, and without it.  The run without it must
miss blocks (cold merges carry no bitmap): proof that the oracle sees a loss.  With it, the
target is 0 missed blocks and every refusal foreseen by `status`: loud, never a surprise.

Run (as root; libvirtd is started if none answers): `.venv/bin/python bench/soak.py
[--seed N] [--minutes M]`, or `make soak`.  Exit status 0 when the targets are met.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

URI = "qemu:///system"
BLOCK = 65536
DISK = 64 * 1024 * 1024
MAX_CHECKPOINTS = 4
REPO = Path(__file__).resolve().parents[1]
#: The daemon's snapshot watch here: libvirt sends no event for a snapshot, and a layer whose
#: whole life falls between two looks leaves nothing to find (see the README).
SNAPSHOT_WATCH = 1
VBD = [sys.executable, "-m", "virt_bitmapd.cli"]

#: What can happen, and how often, given what the domain is like (see ``choose``).
WEIGHTS = {
    "write": 30,
    "checkpoint": 8,
    "snapshot": 8,
    "live_commit": 6,
    "active_commit": 6,
    "cold_merge": 6,
    "cold_merge_deleted": 2,
    "stop_start": 3,
    "daemon_term": 2,
    "daemon_kill": 2,
    "libvirtd_restart": 1,
}
COMMITS = ("live_commit", "active_commit", "cold_merge", "cold_merge_deleted")


def run(*command: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a command; one that fails only because another process briefly holds an image's
    lock (the daemon reading it) is tried again for a few seconds, as a careful tool would."""
    deadline = time.monotonic() + 15
    while True:
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode == 0 or not check:
            return result
        if "lock" not in result.stderr or time.monotonic() > deadline:
            said = (result.stderr.strip() + " " + result.stdout.strip()).strip()
            raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}): {said}")
        time.sleep(0.2)


def virsh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run("virsh", "-c", URI, *args, check=check)


def blocks(offset: int, length: int) -> set[int]:
    return set(range(offset // BLOCK, -(-(offset + length) // BLOCK)))


@dataclass
class Model:
    """What the sequence knows of the disk, to choose what may happen next.  Every event
    leaves the domain running."""

    layers: int = 1


def choose(rng: random.Random, model: Model) -> tuple[str, int]:
    """The next event and a random number for it; depends only on ``rng`` and ``model``."""
    possible = dict(WEIGHTS)
    if model.layers < 3:
        possible.pop("live_commit")
    if model.layers < 2:
        possible.pop("active_commit")
        possible.pop("cold_merge")
        possible.pop("cold_merge_deleted")
    kinds = list(possible)
    kind = rng.choices(kinds, weights=[possible[k] for k in kinds])[0]
    return kind, rng.randrange(1 << 30)


def advance(model: Model, kind: str) -> None:
    if kind == "snapshot":
        model.layers += 1
    elif kind in COMMITS:
        model.layers -= 1


@dataclass
class Figures:
    operations: int = 0
    commits: int = 0
    backups: int = 0
    missed_blocks: int = 0
    extra_blocks: int = 0
    refused: int = 0
    #: refused, and `virt-bitmapd status` showed it quarantined (untrusted) beforehand
    refused_quarantined: int = 0
    #: refused, and status showed it missing or broken beforehand (a bitmap gone with a file
    #: deleted before its bits could be carried, named untrusted when that happened)
    refused_foreseen: int = 0
    seconds: float = 0.0
    misses: list[str] = field(default_factory=list)


class Daemon:
    """`virt-bitmapd run` as a child whose JSON log lines are read."""

    def __init__(self, folder: Path) -> None:
        self.config = folder / "config.toml"
        self.log = folder / "daemon.log"
        self.config.write_text(
            f'[storage]\nroots = ["{folder}"]\n'
            f'[daemon]\nstate_dir = "{folder / "state"}"\n'
            f"snapshot_watch_interval = {SNAPSHOT_WATCH}\n"
            '[metrics]\nlisten = ""\n[log]\nformat = "json"\n'
        )
        self.process: subprocess.Popen[bytes] | None = None
        self._seen = 0

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [*VBD, "run", "--config", str(self.config)], stdout=out, stderr=subprocess.STDOUT
            )
        self.wait_for("libvirt_connected")

    def stop(self, signum: int = signal.SIGTERM) -> None:
        if self.process is not None:
            self.process.send_signal(signum)
            self.process.wait(timeout=30)
            self.process = None

    def entries(self) -> list[dict[str, Any]]:
        found = []
        for line in self.log.read_text(errors="replace").splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(entry, dict):
                found.append(entry)
        return found

    def mark(self) -> None:
        """Later waits only look at what is logged from now on."""
        self._seen = len(self.entries())

    def wait_for(self, event: str, timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entries = self.entries()
            for entry in entries[self._seen :]:
                if entry.get("event") == event:
                    self._seen = entries.index(entry) + 1
                    return entry
            time.sleep(0.05)
        raise RuntimeError(f"the daemon logged no {event} within {timeout} s; see {self.log}")

    def signal(self, signum: int) -> None:
        if self.process is not None:
            self.process.send_signal(signum)


class Life:
    """One domain and its disk, driven through virsh and QEMU's tools, with the oracle."""

    def __init__(self, folder: Path, daemon: Daemon | None, figures: Figures) -> None:
        self.folder = folder
        self.daemon = daemon
        self.figures = figures
        self.name = f"vbd-soak-{folder.name}-{random.randrange(1 << 24):06x}"
        self.uuid = str(uuid.uuid4())
        base = folder / "base.qcow2"
        run("qemu-img", "create", "-q", "-f", "qcow2", str(base), str(DISK))
        self.chain = [base]  # top first
        self.made = 0
        #: checkpoint -> the blocks written since it was taken
        self.truth: dict[str, set[int]] = {}
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

    # ------------------------------------------------------------ what happens

    def do(self, kind: str, number: int) -> None:
        getattr(self, kind)(number)
        if kind in COMMITS:
            self.figures.commits += 1
            self.back_up_every_checkpoint()

    def write(self, number: int) -> None:
        offset = (number % (DISK // 4096 - 64)) * 4096
        length = 4096 * (1 + number % 40)
        device = "/machine/peripheral/virtio-disk0/virtio-backend"
        command = f'qemu-io -d {device} "write -P {number % 251} {offset} {length}"'
        said = virsh("qemu-monitor-command", self.name, "--hmp", command).stdout
        if "error" in said.lower():
            raise RuntimeError(f"guest write failed: {said}")
        for written in self.truth.values():
            written.update(blocks(offset, length))

    def checkpoint(self, _: int) -> None:
        while len(self.truth) >= MAX_CHECKPOINTS:  # a backup tool keeps a few
            oldest = next(iter(self.truth))
            self.delete_checkpoint(oldest)
            del self.truth[oldest]
        self.taken += 1
        name = f"cp{self.taken}"
        virsh("checkpoint-create-as", self.name, name, "--diskspec", "vda")
        self.truth[name] = set()

    def snapshot(self, _: int) -> None:
        self.mark()
        self.made += 1
        overlay = self.folder / f"s{self.made}.qcow2"
        virsh(
            "snapshot-create-as", self.name, "--disk-only", "--no-metadata",
            "--diskspec", f"vda,file={overlay}",
        )  # fmt: skip
        self.chain.insert(0, overlay)
        if self.daemon is not None:  # a snapshot lives a little while before it is merged
            self.daemon.wait_for("chain_changed", timeout=10 * SNAPSHOT_WATCH + 10)

    def live_commit(self, _: int) -> None:
        self.mark()
        top, base = self.chain[1], self.chain[2]
        virsh("blockcommit", self.name, "vda", "--top", str(top), "--base", str(base), "--wait")
        self.chain.remove(top)
        self.settle()

    def active_commit(self, _: int) -> None:
        self.mark()
        base = str(self.chain[1])  # without --base, virsh commits the whole chain
        virsh("blockcommit", self.name, "vda", "--active", "--pivot", "--base", base, "--wait")
        self.chain.pop(0)
        self.settle()

    def cold_merge(self, number: int) -> None:
        """oVirt's way, while the domain is shut off: `qemu-img commit` of one layer into the
        one below it, its child rebased, the domain defined on what is left."""
        self.merge_at_rest(number, delete=False)

    def cold_merge_deleted(self, number: int) -> None:
        """The same by a tool that deletes the committed file at once, before anyone could
        read its bitmaps: what it held cannot be proven in the base any more."""
        self.merge_at_rest(number, delete=True)

    def merge_at_rest(self, number: int, *, delete: bool) -> None:
        self.stop()
        index = number % (len(self.chain) - 1)
        layer, below = self.chain[index], self.chain[index + 1]
        self.mark()
        run("qemu-img", "commit", "-q", "-d", "-b", str(below), str(layer))
        if index > 0:
            child = self.chain[index - 1]
            run("qemu-img", "rebase", "-q", "-u", "-b", str(below), "-F", "qcow2", str(child))
        self.chain.remove(layer)
        self.define()
        if delete:
            layer.unlink()
        if self.daemon is not None:
            self.daemon.signal(signal.SIGHUP)
            self.settle()
        virsh("start", self.name)

    def stop_start(self, _: int) -> None:
        self.stop()
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

    # ------------------------------------------------------------ the oracle

    def mark(self) -> None:
        if self.daemon is not None:
            self.daemon.mark()

    def settle(self) -> None:
        """With the daemon: until it has logged the commit's reconciliation."""
        if self.daemon is not None:
            self.daemon.wait_for("reconciliation")

    def back_up_every_checkpoint(self) -> None:
        for name in list(self.truth):
            self.figures.backups += 1
            exported = self.backup(name)
            if exported is None:
                self.figures.refused += 1
                state, reason = self.status_of(name)
                if state == "untrusted":
                    self.figures.refused_quarantined += 1
                elif state in ("missing", "broken"):
                    self.figures.refused_foreseen += 1
                else:
                    self.figures.misses.append(f"refused {name}: status said {state}: {reason}")
                self.delete_checkpoint(name)  # the tool takes a full backup instead
                del self.truth[name]
                continue
            missed = self.truth[name] - exported
            self.figures.missed_blocks += len(missed)
            self.figures.extra_blocks += len(exported - self.truth[name])
            if missed:
                self.figures.misses.append(f"{name}: {len(missed)} block(s)")

    def delete_checkpoint(self, name: str) -> None:
        """With its bitmaps; only its metadata when libvirt finds no bitmap to delete."""
        if virsh("checkpoint-delete", self.name, name, check=False).returncode != 0:
            virsh("checkpoint-delete", self.name, name, "--metadata")

    def backup(self, checkpoint: str) -> set[int] | None:
        """The blocks a pull-mode incremental backup from ``checkpoint`` exports; None when
        libvirt refuses it."""
        socket, scratch = self.folder / "backup.sock", self.folder / "scratch.qcow2"
        scratch.unlink(missing_ok=True)
        description = self.folder / "backup.xml"
        description.write_text(
            f"<domainbackup mode='pull'><incremental>{checkpoint}</incremental>"
            f"<server transport='unix' socket='{socket}'/><disks>"
            f"<disk name='vda' backup='yes' type='file'><scratch file='{scratch}'/></disk>"
            "</disks></domainbackup>"
        )
        if virsh("backup-begin", self.name, str(description), check=False).returncode != 0:
            return None
        try:
            options = (
                f"driver=nbd,server.type=unix,server.path={socket},export=vda,"
                "x-dirty-bitmap=qemu:dirty-bitmap:backup-vda"
            )
            mapped = run("qemu-img", "map", "--output=json", "--image-opts", options).stdout
        finally:
            self.end_backup()
            scratch.unlink(missing_ok=True)
        exported: set[int] = set()
        for extent in json.loads(mapped):
            if not extent["data"]:  # qemu-img map shows dirty extents as "data": false
                exported |= blocks(extent["start"], extent["length"])
        return exported

    def end_backup(self) -> None:
        """Abort the backup job and wait until it is gone: virsh's `blockcommit --wait` takes
        a late "canceled" event of the backup on the same disk for its own commit's end."""
        virsh("domjobabort", self.name, check=False)
        deadline = time.monotonic() + 30
        while "None" not in virsh("domjobinfo", self.name, check=False).stdout:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the backup job of {self.name} did not end")
            time.sleep(0.05)
        time.sleep(0.2)  # its events are delivered

    def status_of(self, checkpoint: str) -> tuple[str, str]:
        """What `virt-bitmapd status` says of ``checkpoint``: its state and the reason."""
        if self.daemon is None:
            return "not asked", ""
        shown = run(*VBD, "status", self.name, "--json", "--config", str(self.daemon.config))
        for domain in json.loads(shown.stdout)["domains"]:
            for disk in domain["disks"]:
                for entry in disk["checkpoints"]:
                    if entry["checkpoint"] == checkpoint:
                        return str(entry["state"]), str(entry["reason"])
        return "not shown", ""


def life(
    folder: Path, seed: int, *, with_daemon: bool, limit: int | None, seconds: float
) -> Figures:
    """Live one sequence: until ``limit`` operations, or ``seconds``, whichever comes first."""
    folder.mkdir(parents=True)
    figures = Figures()
    daemon = Daemon(folder) if with_daemon else None
    rng = random.Random(seed)
    model = Model()
    started = time.monotonic()
    if daemon is not None:
        daemon.start()
    domain = Life(folder, daemon, figures)
    try:
        # A prelude that always holds the cold merge that loses data silently without the
        # daemon (issue 12): cp1 is taken on s1, s1 is committed into base, s2 rebased onto
        # base: cp1 then lives only in s2, which libvirt accepts without s1's writes.
        prelude = [
            ("snapshot", 0),
            ("checkpoint", 0),
            ("write", 1000),
            ("snapshot", 0),
            ("write", 5000),
            ("cold_merge", 1),
        ]
        steps = iter(prelude)
        while limit is None or figures.operations < limit:
            if limit is None and time.monotonic() - started > seconds:
                break
            step = next(steps, None) or choose(rng, model)
            with (folder / "operations.log").open("a") as record:
                record.write(f"{time.time():.3f} {step[0]} {step[1]}\n")
            domain.do(*step)
            advance(model, step[0])
            figures.operations += 1
    finally:
        domain.remove()
        if daemon is not None:
            daemon.stop()
    figures.seconds = time.monotonic() - started
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--minutes",
        type=float,
        default=4.0,
        help="time for the run with the daemon (the run "
        "without it replays the same operations, usually faster)",
    )
    args = parser.parse_args()
    run(str(REPO / "scripts" / "libvirt-up.sh"))
    folder = Path(tempfile.mkdtemp(prefix=f"vbd-soak-{args.seed}-", dir="/var/tmp"))
    try:
        kept = life(
            folder / "with", args.seed, with_daemon=True, limit=None, seconds=args.minutes * 60
        )
        plain = life(
            folder / "without", args.seed, with_daemon=False, limit=kept.operations, seconds=0
        )
    except BaseException:
        print(f"soak: stopped by an error; its files and the daemon's log are in {folder}")
        raise
    shutil.rmtree(folder, ignore_errors=True)
    print(f"soak: seed {args.seed}, {kept.operations} operations in each run")
    print(f"{'':28}{'with the daemon':>18}{'without':>10}")
    for label, attribute in [
        ("seconds", "seconds"),
        ("commits", "commits"),
        ("incremental backups", "backups"),
        ("missed blocks", "missed_blocks"),
        ("extra blocks (harmless)", "extra_blocks"),
        ("refused backups", "refused"),
        ("  foreseen: quarantined", "refused_quarantined"),
        ("  foreseen: missing, broken", "refused_foreseen"),
    ]:
        a, b = getattr(kept, attribute), getattr(plain, attribute)
        print(f"{label:28}{a:>18.0f}{b:>10.0f}")
    for miss in kept.misses:
        print(f"with the daemon: {miss}")
    met = (
        kept.missed_blocks == 0
        and kept.refused == kept.refused_quarantined + kept.refused_foreseen
        and plain.missed_blocks > 0
    )
    if plain.missed_blocks == 0:
        print("the run without the daemon missed nothing: the oracle proved nothing")
    print("targets met" if met else "TARGETS NOT MET")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
