"""Benchmark: `virt-bitmapd reconcile` against one `qemu-img bitmap` call per operation.

The baseline is what oVirt's cold merge does after `qemu-img commit`: for every bitmap, one
`qemu-img bitmap --add` on the base, then one `qemu-img bitmap --merge` per committed layer.

Setup: a 1 TiB sparse disk, an 8-layer subchain above its base, 16 checkpoint bitmaps recording
in every layer, scattered dirty blocks in each layer.  Both contenders start from byte-identical
copies of the same committed chain, in the same run, and must end with identical bitmaps.

Run: `.venv/bin/python bench/reconcile_vs_qemu_img.py [--rounds N]`
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LAYERS = 8
BITMAPS = 16
SIZE = "1T"
WRITES_PER_LAYER = 24
BLOCK = 65536
VBD = [sys.executable, "-m", "virt_bitmapd.cli"]


def run(*command: str) -> str:
    return subprocess.run(command, check=True, capture_output=True, text=True).stdout


def build(folder: Path) -> tuple[Path, list[Path]]:
    """base + LAYERS overlays, every bitmap recording in each, then `qemu-img commit -d`."""
    rng = random.Random(1)
    base = folder / "base.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(base), SIZE)
    layers: list[Path] = []
    below = base
    for index in range(LAYERS):
        layer = folder / f"layer{index}.qcow2"
        run("qemu-img", "create", "-q", "-f", "qcow2", "-b", str(below), "-F", "qcow2", str(layer))
        for bitmap in range(BITMAPS):
            run("qemu-img", "bitmap", "--add", str(layer), f"checkpoint-{bitmap:02d}")
        commands = []
        for _ in range(WRITES_PER_LAYER):
            offset = rng.randrange(0, (1 << 40) // BLOCK) * BLOCK
            commands += ["-c", f"write -q -P {index + 1} {offset} {BLOCK}"]
        run("qemu-io", "-f", "qcow2", *commands, str(layer))
        layers.append(layer)
        below = layer
    top = layers[-1]
    run("qemu-img", "commit", "-q", "-d", "-b", str(base), str(top))
    return base, layers


def baseline(base: Path, layers: list[Path]) -> None:
    for bitmap in range(BITMAPS):
        name = f"checkpoint-{bitmap:02d}"
        run("qemu-img", "bitmap", "--add", str(base), name)
        for layer in reversed(layers):
            run(
                "qemu-img",
                "bitmap",
                "--merge",
                name,
                "-b",
                str(layer),
                "-F",
                "qcow2",
                str(base),
                name,
            )


def ours(base: Path, top: Path) -> None:
    run(*VBD, "reconcile", "--top", str(top), "--base", str(base))


def time_once(name: str, base: Path, layers: list[Path]) -> float:
    if name == "baseline":
        start = time.perf_counter()
        baseline(base, layers)
    else:
        # this copy is the commit base now: point the bottom layer at it (not timed)
        run("qemu-img", "rebase", "-u", "-b", str(base), "-F", "qcow2", str(layers[0]))
        start = time.perf_counter()
        ours(base, layers[-1])
    return time.perf_counter() - start


def bitmap_digest(base: Path) -> list[tuple[str, int, list[str]]]:
    info = json.loads(run("qemu-img", "info", "--output=json", str(base)))
    return sorted(
        (b["name"], b["granularity"], sorted(b["flags"]))
        for b in info["format-specific"]["data"].get("bitmaps", [])
    )


def bitmap_hashes(base: Path) -> dict[str, str]:
    """SHA-256 of each bitmap's content, as QEMU computes it, to prove both ends agree."""
    commands = [
        {"execute": "qmp_capabilities"},
        {
            "execute": "blockdev-add",
            "arguments": {
                "driver": "qcow2",
                "node-name": "b",
                "read-only": True,
                "file": {"driver": "file", "filename": str(base), "read-only": True},
            },
        },
    ]
    names = [f"checkpoint-{i:02d}" for i in range(BITMAPS)]
    commands += [
        {"execute": "x-debug-block-dirty-bitmap-sha256", "arguments": {"node": "b", "name": n}}
        for n in names
    ]
    commands.append({"execute": "quit"})
    stdin = "".join(json.dumps(c) + "\n" for c in commands)
    out = subprocess.run(
        ["qemu-storage-daemon", "--chardev", "stdio,id=m", "--monitor", "chardev=m"],
        input=stdin,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    answers = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    hashes = [
        a["return"]["sha256"]
        for a in answers
        if isinstance(a.get("return"), dict) and "sha256" in a["return"]
    ]
    return dict(zip(names, hashes, strict=True))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds of each (default 3)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="vbd-bench-") as tmp:
        folder = Path(tmp)
        print(f"building: {SIZE} sparse disk, {LAYERS}-layer subchain, {BITMAPS} bitmaps ...")
        pristine, layers = build(folder)
        times: dict[str, list[float]] = {"baseline": [], "virt-bitmapd": []}
        results = {}
        for _ in range(args.rounds):
            for name, samples in times.items():
                copy = folder / f"{name}.qcow2"
                shutil.copyfile(pristine, copy)
                samples.append(time_once(name, copy, layers))
                results[name] = (bitmap_digest(copy), bitmap_hashes(copy))
        if results["baseline"] != results["virt-bitmapd"]:
            print("MISMATCH: the two methods left different bitmaps", file=sys.stderr)
            return 1
        calls = BITMAPS * (1 + LAYERS)
        base_t = statistics.median(times["baseline"])
        ours_t = statistics.median(times["virt-bitmapd"])
        print(f"baseline (oVirt-style, {calls} qemu-img bitmap calls): {base_t:8.3f} s median")
        print(f"virt-bitmapd reconcile (one transaction, whole CLI):  {ours_t:8.3f} s median")
        print(f"ratio: {base_t / ours_t:.1f}x faster than the baseline (target: 10x)")
        print("identical bitmaps (names, flags, granularity, content sha256): yes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
