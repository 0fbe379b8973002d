"""Idle cost: what the daemon costs a host where nothing changes, and how soon it answers when
something does.

Real OS-less domains on the real libvirtd: N running ones (N = 10, 50, 100 by default), each a
two-layer qcow2 chain with two checkpoint bitmaps, beside 500 defined, shut-off ones with two- or
three-layer chains and bitmaps. For each N, ``virt-bitmapd run`` with its defaults (fresh state
directory) is measured:

* startup: from its start until every disk's look is done (its ``rescan_finished`` line), and
  the most QEMU tool processes it ran at once (sampled every 10 ms);
* a quiet window (``--window``, one safety-net period by default): its CPU (its children's
  included) as % of one core, libvirtd's CPU against the same length of window without the
  daemon, its RSS;
* a periodic rescan's cost, from a restart with ``--rescan-interval 10`` (warm state directory,
  whose startup time is also shown), spread over the default 300 s;
* the baseline, named "5 s XML": the previous defaults, each running domain's XML read every
  5 s (``--snapshot-watch-interval 5 --no-watch``), in the same kind of window.

Then, at the largest N: the latency from a live commit's COMPLETED event (as this benchmark's
own libvirt connection receives it) to the daemon's reconciliation line, over ``--commits``
commits of a layer made by a snapshot just before. The per-disk slope is the least-squares fit
of the daemon's CPU against N. Targets (issue "cost in proportion to change"): at 100 running
disks the daemon <= 0.1 % of a core and libvirtd's added CPU <= 0.1 %, RSS <= 48 MiB, startup
<= 30 s, never more QEMU tools than ``concurrency`` (4), event to reconciliation p50 <= 100 ms.

Run as root (libvirtd is started if none answers): ``.venv/bin/python bench/idle_cost.py`` or
``make idle-cost``; a few minutes per N. Exit status 0 when the targets are met.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import libvirt

REPO = Path(__file__).resolve().parents[1]
URI = "qemu:///system"
PREFIX = "vbd-idle"
TICK = os.sysconf("SC_CLK_TCK")
TOOLS = ("qemu-img", "qemu-storage-d")  # /proc comm is cut at 15 characters
DEFAULT_RESCAN = 300.0
CONCURRENCY = 4


def run(*command: str) -> str:
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {result.stderr.strip()}")
    return result.stdout


# ------------------------------------------------------------------ processes


def cpu_seconds(pid: int) -> float:
    """User + system time of ``pid`` and of its children it waited for."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(value) for value in fields[11:15]) / TICK


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def pid_of(command: str) -> int:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() == command:
                    return int(entry.name)
            except OSError:
                continue
    raise RuntimeError(f"no {command} process")


def tools_of(pid: int) -> int:
    """How many QEMU tool processes ``pid`` runs now."""
    count = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        if parent == pid and name in TOOLS:
            count += 1
    return count


# ------------------------------------------------------------------ the host


def domain_xml(name: str, top: Path) -> str:
    kind = "kvm" if os.access("/dev/kvm", os.R_OK | os.W_OK) else "qemu"
    return f"""<domain type='{kind}'>
  <name>{name}</name>
  <memory unit='MiB'>32</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='{top}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
  </devices>
</domain>"""


def make_chain(folder: Path, name: str, layers: int) -> Path:
    """base (cp1) <- [mid (cp1, cp2)] <- top (cp1, cp2): every layer holds the bitmaps libvirt
    would have copied into it."""
    below: Path | None = None
    for index in range(layers):
        path = folder / f"{name}.{index}.qcow2"
        if below is None:
            run("qemu-img", "create", "-q", "-f", "qcow2", str(path), "64M")
        else:
            run(
                "qemu-img",
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                str(below),
                "-F",
                "qcow2",
                str(path),
            )
        for bitmap in ("cp1", "cp2")[: 1 if index == 0 else 2]:
            run("qemu-img", "bitmap", "--add", str(path), bitmap)
        below = path
    assert below is not None
    return below


def remove_domains(conn: libvirt.virConnect) -> None:
    for dom in conn.listAllDomains(0):
        if dom.name().startswith(PREFIX):
            if dom.isActive():
                dom.destroy()
            dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA)


@dataclass
class Host:
    conn: libvirt.virConnect
    folder: Path
    running: list[Any]
    stopped: list[Any]

    @classmethod
    def build(cls, conn: libvirt.virConnect, folder: Path, running: int, stopped: int) -> Host:
        names = [f"{PREFIX}-r{i:03d}" for i in range(running)]
        names += [f"{PREFIX}-s{i:03d}" for i in range(stopped)]

        images = folder / "images"
        images.mkdir()

        def chain(item: tuple[int, str]) -> Path:
            index, name = item
            layers = 2 if name.startswith(f"{PREFIX}-r") or index % 2 else 3
            return make_chain(images, name, layers)

        with ThreadPoolExecutor(4) as pool:
            tops = list(pool.map(chain, enumerate(names)))
        domains = [conn.defineXML(domain_xml(n, t)) for n, t in zip(names, tops, strict=True)]
        return cls(conn, folder, domains[:running], domains[running:])

    def start(self, count: int) -> None:
        for dom in self.running[:count]:
            if not dom.isActive():
                dom.create()


# ------------------------------------------------------------------ the daemon


class Daemon:
    def __init__(self, folder: Path, state: Path, *extra: str) -> None:
        self.log = folder / f"daemon-{time.monotonic_ns()}.log"
        config = folder / "config.toml"
        config.write_text(
            f"[storage]\nroots = [{json.dumps(str(folder / 'images'))}]\n"
            f"[daemon]\nstate_dir = {json.dumps(str(state))}\n"
            '[log]\nformat = "json"\nlevel = "debug"\n'
            f'[metrics]\nlisten = "127.0.0.1:{free_port()}"\n'
        )
        command = [sys.executable, "-m", "virt_bitmapd.cli", "run", "--config", str(config)]
        self.started = time.monotonic()
        with self.log.open("wb") as out:
            self.process = subprocess.Popen([*command, *extra], stdout=out, stderr=out)
        self.pid = self.process.pid

    def entries(self) -> list[dict[str, Any]]:
        lines = self.log.read_text().splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]

    def wait(self, predicate: Any, timeout: float, what: str, skip: int = 0) -> dict[str, Any]:
        """The first log entry beyond the first ``skip`` ones matching ``predicate``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the daemon exited: {self.log.read_text()[-2000:]}")
            for entry in self.entries()[skip:]:
                if predicate(entry):
                    return entry
            time.sleep(0.05)
        raise RuntimeError(f"no {what} within {timeout} s")

    def startup(self, timeout: float = 300) -> tuple[float, int]:
        """Seconds until the startup rescan's looks were all done, and the most QEMU tools run
        at once meanwhile."""
        most = 0
        deadline = time.monotonic() + timeout
        checked = time.monotonic()
        while time.monotonic() < deadline:
            most = max(most, tools_of(self.pid))
            if time.monotonic() - checked > 0.2:
                checked = time.monotonic()
                if self.process.poll() is not None:
                    raise RuntimeError(f"the daemon exited: {self.log.read_text()[-2000:]}")
                if '"rescan_finished"' in self.log.read_text():
                    finished = next(e for e in self.entries() if is_startup_done(e))
                    return float(finished["seconds"]), most
            time.sleep(0.01)
        raise RuntimeError(f"the daemon did not finish its startup within {timeout} s")

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=30)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def is_startup_done(entry: dict[str, Any]) -> bool:
    return entry.get("event") == "rescan_finished" and entry.get("trigger") == "startup"


def window(seconds: float, *pids: int) -> list[float]:
    """CPU of each process over ``seconds``, as % of one core."""
    before = [cpu_seconds(pid) for pid in pids]
    time.sleep(seconds)
    return [(cpu_seconds(pid) - b) / seconds * 100 for pid, b in zip(pids, before, strict=True)]


# ------------------------------------------------------------------ measuring


@dataclass
class Row:
    running: int
    disks: int
    startup: float
    tools: int
    warm_startup: float
    daemon: float  # % of a core: quiet window plus rescans spread over their interval
    quiet: float
    rescan_each: float  # CPU seconds per periodic rescan
    libvirtd: float
    rss: float
    baseline_daemon: float
    baseline_libvirtd: float


def measure(host: Host, n: int, args: argparse.Namespace) -> Row:
    host.start(n)
    time.sleep(5)
    libvirtd = pid_of("libvirtd")
    (libvirtd_alone,) = window(args.quiet, libvirtd)
    state = host.folder / f"state-{n}"
    shutil.rmtree(state, ignore_errors=True)

    daemon = Daemon(host.folder, state)
    startup, tools = daemon.startup()
    time.sleep(5)
    quiet, libvirtd_with = window(args.window, daemon.pid, libvirtd)
    rss = rss_mib(daemon.pid)
    daemon.stop()

    rescanning = Daemon(host.folder, state, "--rescan-interval", "10")
    warm, _ = rescanning.startup()
    time.sleep(2)
    seen = len(rescanning.entries())
    span = 35.0
    (with_rescans,) = window(span, rescanning.pid)
    rescans = sum(
        1
        for e in rescanning.entries()[seen:]
        if e.get("event") == "rescan_done" and e.get("trigger") == "rescan"
    )
    rescanning.stop()
    rescan_each = max(0.0, (with_rescans - quiet) / 100 * span / max(rescans, 1))

    baseline = Daemon(host.folder, state, "--snapshot-watch-interval", "5", "--no-watch")
    baseline.startup()
    time.sleep(2)
    baseline_daemon, baseline_libvirtd = window(args.baseline_window, baseline.pid, libvirtd)
    baseline.stop()
    return Row(
        running=n,
        disks=len(host.running) + len(host.stopped),
        startup=startup,
        tools=tools,
        warm_startup=warm,
        daemon=quiet + rescan_each / DEFAULT_RESCAN * 100,
        quiet=quiet,
        rescan_each=rescan_each,
        libvirtd=max(0.0, libvirtd_with - libvirtd_alone),
        rss=rss,
        baseline_daemon=baseline_daemon,
        baseline_libvirtd=max(0.0, baseline_libvirtd - libvirtd_alone),
    )


def timestamp(entry: dict[str, Any]) -> float:
    return datetime.fromisoformat(str(entry["timestamp"]).replace("Z", "+00:00")).timestamp()


def latencies(host: Host, commits: int) -> tuple[list[float], list[float]]:
    """Seconds from a live commit's COMPLETED event to the daemon's reconciliation line, as
    this connection received the event and as the daemon did."""
    completed: list[float] = []
    done = threading.Event()

    def on_block_job(_c: Any, _d: Any, _disk: str, kind: int, status: int, _o: Any) -> None:
        commit = kind == libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_COMMIT
        if commit and status == libvirt.VIR_DOMAIN_BLOCK_JOB_COMPLETED:
            completed.append(time.time())
            done.set()

    conn = libvirt.open(URI)
    callback = conn.domainEventRegisterAny(
        None, libvirt.VIR_DOMAIN_EVENT_ID_BLOCK_JOB_2, on_block_job, None
    )
    dom = host.running[0]
    name = dom.name()
    state = host.folder / "state-latency"
    shutil.rmtree(state, ignore_errors=True)
    daemon = Daemon(host.folder, state)
    daemon.startup()
    to_event, to_receipt = [], []
    try:
        for index in range(commits):
            overlay = host.folder / "images" / f"{name}.lat{index}.qcow2"
            skip = len(daemon.entries())
            run(
                "virsh", "-c", URI, "snapshot-create-as", name, "--disk-only", "--no-metadata",
                "--diskspec", f"vda,file={overlay}",
            )  # fmt: skip
            changed = daemon.wait(
                lambda e: e.get("event") == "chain_changed" and e.get("domain") == name,
                10,
                "the snapshot known",
                skip,
            )
            base, below_top = changed["chain"][-1], changed["chain"][1]
            done.clear()
            skip = len(daemon.entries())
            run(
                "virsh", "-c", URI, "blockcommit", name, "vda", "--top", below_top,
                "--base", base, "--wait",
            )  # fmt: skip
            if not done.wait(10):
                raise RuntimeError("no COMPLETED event for the commit")
            line = daemon.wait(
                lambda e: e.get("event") == "reconciliation" and e.get("domain") == name,
                10,
                "the reconciliation",
                skip,
            )
            receipt = daemon.wait(
                lambda e: (
                    e.get("event") == "block_job_event"
                    and e.get("domain") == name
                    and e.get("status") == "completed"
                ),
                10,
                "the daemon's event line",
                skip,
            )
            if line.get("result") != "already_consistent":
                raise RuntimeError(f"unexpected reconciliation: {line}")
            to_event.append(timestamp(line) - completed[-1])
            to_receipt.append(timestamp(line) - timestamp(receipt))
    finally:
        daemon.stop()
        conn.domainEventDeregisterAny(callback)
        conn.close()
    return to_event, to_receipt


def event_loop() -> None:
    libvirt.virEventRegisterDefaultImpl()

    def spin() -> None:
        while True:
            libvirt.virEventRunDefaultImpl()

    threading.Thread(target=spin, daemon=True, name="libvirt-events").start()


def slope(rows: list[Row]) -> float:
    """Least-squares % of a core per running disk."""
    xs = [float(r.running) for r in rows]
    ys = [r.daemon for r in rows]
    if len(rows) < 2:
        return 0.0
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    spread = sum((x - mean_x) ** 2 for x in xs)
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / spread


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--running", default="10,50,100", help="N running domains, comma-separated")
    parser.add_argument("--stopped", type=int, default=500, help="shut-off domains beside them")
    parser.add_argument("--window", type=float, default=120, help="quiet window, seconds")
    parser.add_argument("--quiet", type=float, default=30, help="window without the daemon")
    parser.add_argument("--baseline-window", type=float, default=30)
    parser.add_argument("--commits", type=int, default=20)
    parser.add_argument("--folder", default="/var/tmp/vbd-idle")
    parser.add_argument("--keep", action="store_true", help="keep the folder (daemon logs)")
    args = parser.parse_args()
    counts = sorted(int(n) for n in args.running.split(","))

    subprocess.run([str(REPO / "scripts" / "libvirt-up.sh")], check=True)
    event_loop()
    conn = libvirt.open(URI)
    folder = Path(args.folder)
    remove_domains(conn)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    rows: list[Row] = []
    try:
        began = time.monotonic()
        host = Host.build(conn, folder, max(counts), args.stopped)
        print(f"built {max(counts)} + {args.stopped} domains in {time.monotonic() - began:.0f} s")
        for n in counts:
            rows.append(measure(host, n, args))
            r = rows[-1]
            print(f"N={n}: daemon {r.daemon:.3f} %, libvirtd +{r.libvirtd:.3f} %", flush=True)
        to_event, to_receipt = latencies(host, args.commits)
    finally:
        remove_domains(conn)
        conn.close()
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)

    print()
    print("| running disks | all disks | startup s (warm) | QEMU tools at once | daemon CPU % "
          "(quiet + rescans) | libvirtd added % | RSS MiB | baseline \"5 s XML\" daemon % / "
          "libvirtd % | daemon vs baseline |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = r.baseline_daemon / r.daemon if r.daemon > 0 else float("inf")
        print(
            f"| {r.running} | {r.disks} | {r.startup:.1f} ({r.warm_startup:.1f}) | {r.tools} | "
            f"{r.daemon:.3f} ({r.quiet:.3f} + {r.rescan_each:.2f} s per rescan) | "
            f"{r.libvirtd:.3f} | {r.rss:.1f} | {r.baseline_daemon:.3f} / "
            f"{r.baseline_libvirtd:.3f} | {ratio:.1f}x less |"
        )
    per_disk = slope(rows)
    p50, p95 = percentile(to_event, 0.5) * 1000, percentile(to_event, 0.95) * 1000
    r50 = percentile(to_receipt, 0.5) * 1000
    print(f"\nper running disk: {per_disk * 1000:.2f} thousandths of a % of a core (slope)")
    print(
        f"live commit COMPLETED event -> reconciliation line, {len(to_event)} commits: "
        f"p50 {p50:.0f} ms, p95 {p95:.0f} ms (from the daemon's own receipt: p50 {r50:.0f} ms)"
    )
    last = rows[-1]
    checks = {
        f"daemon <= 0.1 % at {last.running} running": last.daemon <= 0.1,
        f"libvirtd added <= 0.1 % at {last.running} running": last.libvirtd <= 0.1,
        "RSS <= 48 MiB": all(r.rss <= 48 for r in rows),
        "startup <= 30 s": all(r.startup <= 30 for r in rows),
        f"QEMU tools at once <= {CONCURRENCY}": all(r.tools <= CONCURRENCY for r in rows),
        "event -> reconciliation p50 <= 100 ms": p50 <= 100,
    }
    for what, met in checks.items():
        print(f"{'met' if met else 'MISSED'}: {what}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
