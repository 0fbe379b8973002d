"""Soak: random lives of a VM's disk, judged by the two readers backup tools use.

One OS-less domain lives through a seeded random sequence of what happens on a host: libvirt
checkpoints, guest writes (through QEMU's device backend, so the recording bitmaps mark them as a
guest's), external disk-only snapshots, live commits, active commits with pivot, cold merges done
with `qemu-img commit` while the domain is shut off (as oVirt does; some by a tool that deletes
the committed file at once, some while the daemon is killed reconciling them), reverts to the
layer below the top, full block copies with pivot (some while the daemon is stopped), a
quarantined bitmap made recording again by hand, a backup job held open while the daemon looks,
stops and starts, daemon restarts (SIGTERM and SIGKILL) and libvirtd restarts.

The ground truth is what every block reads (``soaklib.content``): a checkpoint must give every
block that reads differently since it was taken.  After every commit, revert or copy, each
checkpoint is backed up as a backup tool does it with libvirt: a pull-mode `virsh backup-begin`
incremental, its exported dirty bitmap read back over NBD.  Whenever the domain is shut off, each
checkpoint is also exported as an offline tool does it: `qemu-nbd -r --bitmap=NAME TOP`.  A block
that changed and is not exported is *missed*.  A refused backup must have been foreseen by
`virt-bitmapd status` (untrusted, missing or broken), and the tool then deletes the checkpoint
(it takes a full backup); an offline tool takes no incremental from a checkpoint whose offline
export `status` does not call safe or complete.

The same sequence runs twice: with `virt-bitmapd run`, and without it.  The run without it must
miss blocks: proof that the oracles see a loss.  With it, the target is 0 missed blocks for both
readers, every refusal foreseen, and no health warning while a backup job runs.

Run (as root; libvirtd is started if none answers): `.venv/bin/python bench/soak.py
[--seed N] [--minutes M]`, or `make soak`.  Exit status 0 when the targets are met.
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from soaklib.checks import Figures
from soaklib.life import COMMITS, Life
from soaklib.tools import REPO, Daemon, run

#: What can happen, and how often, given what the domain is like (see ``choose``).
WEIGHTS = {
    "write": 30,
    "checkpoint": 8,
    "snapshot": 9,
    "live_commit": 5,
    "active_commit": 5,
    "cold_merge": 5,
    "cold_merge_deleted": 2,
    "cold_merge_killed": 2,
    "cold_merge_reconciled": 2,
    "heal_by_hand": 2,
    "revert": 2,
    "block_copy": 2,
    "reenable": 2,
    "backup_held": 2,
    "stop_start": 3,
    "daemon_term": 2,
    "daemon_kill": 2,
    "libvirtd_restart": 1,
}
#: Operations that need at least this many layers.
NEEDS_LAYERS = {
    "live_commit": 3,
    "active_commit": 2,
    "cold_merge": 2,
    "cold_merge_deleted": 2,
    "cold_merge_killed": 2,
    "cold_merge_reconciled": 2,
    "revert": 2,
}


@dataclass
class Model:
    """What the sequence knows of the disk, to choose what may happen next."""

    layers: int = 1


def choose(rng: random.Random, model: Model) -> tuple[str, int]:
    """The next event and a random number for it; depends only on ``rng`` and ``model``."""
    possible = {k: w for k, w in WEIGHTS.items() if model.layers >= NEEDS_LAYERS.get(k, 1)}
    kinds = list(possible)
    kind = rng.choices(kinds, weights=[possible[k] for k in kinds])[0]
    return kind, rng.randrange(1 << 30)


def advance(model: Model, kind: str) -> None:
    if kind in ("snapshot", "heal_by_hand"):
        model.layers += 1
    elif kind == "block_copy":
        model.layers = 1
    elif kind in COMMITS:
        model.layers -= 1


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
        # base: cp1 then lives only in s2, which libvirt accepts without s1's writes; and a
        # revert, which no bitmap can see.
        prelude = [
            ("snapshot", 0),
            ("checkpoint", 0),
            ("write", 1000),
            ("snapshot", 0),
            ("write", 5000),
            ("cold_merge", 1),
            ("snapshot", 0),
            ("write", 9000),
            ("revert", 0),
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


def report(kept: Figures, plain: Figures, seed: int) -> bool:
    """Print both runs side by side; whether the targets are met."""
    print(f"soak: seed {seed}, {kept.operations} operations in each run")
    print(f"{'':36}{'with the daemon':>18}{'without':>10}")
    rows = [("seconds", kept.seconds, plain.seconds), ("commits", kept.commits, plain.commits)]
    for title, which in (("libvirt's backup", "online"), ("offline export", "offline")):
        a, b = getattr(kept, which), getattr(plain, which)
        rows += [
            (f"{title}: backups", a.backups, b.backups),
            ("  missed blocks", a.missed_blocks, b.missed_blocks),
            ("  extra blocks (harmless)", a.extra_blocks, b.extra_blocks),
            ("  refused", a.refused, b.refused),
            ("  foreseen by status", a.foreseen, b.foreseen),
        ]
    rows.append(("health warnings during a backup job", kept.job_warnings, plain.job_warnings))
    for label, a, b in rows:
        print(f"{label:36}{a:>18.0f}{b:>10.0f}")
    print("operations: " + ", ".join(f"{k} {n}" for k, n in sorted(kept.done.items())))
    print("virt-bitmapd heal by hand: " + ", ".join(
        f"{outcome} {count}" for outcome, count in sorted(kept.heals.items())
    ))  # fmt: skip
    print("reconciliations with the daemon: " + ", ".join(
        f"{result} {count}" for result, count in sorted(kept.results.items())
    ))  # fmt: skip
    for why in kept.unproven:
        print(f"unproven: {why[:160]}")
    for miss in kept.online.misses + kept.offline.misses:
        print(f"with the daemon: {miss}")
    online, offline = kept.online, kept.offline
    met = (
        online.missed_blocks == 0
        and offline.missed_blocks == 0
        and not online.misses
        and not offline.misses
        and online.refused == online.foreseen
        and kept.job_warnings == 0
        and plain.online.missed_blocks + plain.offline.missed_blocks > 0
    )
    if plain.online.missed_blocks + plain.offline.missed_blocks == 0:
        print("the run without the daemon missed nothing: the oracles proved nothing")
    print("targets met" if met else "TARGETS NOT MET")
    return met


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
    parser.add_argument(
        "--keep", action="store_true", help="keep the runs' files and logs even when met"
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
    met = report(kept, plain, args.seed)
    if met and not args.keep:
        shutil.rmtree(folder, ignore_errors=True)
    else:
        print(f"the runs' files and the daemon's log are in {folder}")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
