"""The tools the soak drives: commands (never a shell), virsh, and `virt-bitmapd run` as a
child whose JSON log lines are read."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

URI = "qemu:///system"
BLOCK = 65536
REPO = Path(__file__).resolve().parents[2]
VBD = [sys.executable, "-m", "virt_bitmapd.cli"]
#: The daemon's snapshot watch here: libvirt sends no event for a snapshot, and a layer whose
#: whole life falls between two looks leaves nothing to find (see the README).
SNAPSHOT_WATCH = 1


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

    def wait_for_rescan(self, timeout: float = 60) -> None:
        """SIGHUP, then until every look that rescan asked for was taken."""
        self.mark()
        self.signal(signal.SIGHUP)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entries = self.entries()
            for entry in entries[self._seen :]:
                if entry.get("event") == "rescan_finished" and entry.get("trigger") == "manual":
                    self._seen = entries.index(entry) + 1
                    return
            time.sleep(0.05)
        raise RuntimeError(f"the daemon's rescan did not finish within {timeout} s")
