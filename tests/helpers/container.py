"""A Debian 12 machine with systemd as PID 1, booted with systemd-nspawn, for the system test.

The root file system is built once per machine (``tests/system/make_rootfs.sh``) and never
changed: each boot mounts an overlay on it whose upper layer is thrown away at shutdown, so runs
do not see each other. The host sees the container's files under :attr:`Container.root` (the test
builds and reads images there with the host's QEMU tools). No D-Bus on the host, so no machinectl:
commands run in the container's namespaces with nsenter.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from helpers.libvirt_env import REPO

T = TypeVar("T")
MAKE_ROOTFS = REPO / "tests" / "system" / "make_rootfs.sh"


def prepare_rootfs() -> Path:
    """The cached rootfs, built first if this machine has none (a few minutes, once)."""
    result = subprocess.run([str(MAKE_ROOTFS)], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"the Debian 12 rootfs could not be built: {result.stderr}")
    return Path(result.stdout.strip().splitlines()[-1])


def wait_until(check: Callable[[], T | None], what: str, timeout: float = 60) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.2)


class Container:
    """One booted container; :meth:`shutdown` powers it off and removes every trace."""

    def __init__(self, rootfs: Path, work: Path, name: str) -> None:
        self.rootfs = rootfs
        self.work = work
        self.name = name
        self.root = work / "root"
        self.log = work / "nspawn.log"
        self._nspawn: subprocess.Popen[bytes] | None = None
        self.pid1 = 0

    def boot(self, timeout: float = 60) -> None:
        for folder in ("upper", "overlay-work", "root"):
            (self.work / folder).mkdir(parents=True)
        options = (
            f"lowerdir={self.rootfs},upperdir={self.work / 'upper'},"
            f"workdir={self.work / 'overlay-work'}"
        )
        _run("mount", "-t", "overlay", "overlay", "-o", options, str(self.root))
        env = {**os.environ, "SYSTEMD_NSPAWN_UNIFIED_HIERARCHY": "1"}
        with self.log.open("wb") as log:
            self._nspawn = subprocess.Popen(
                [
                    "systemd-nspawn", "-D", str(self.root), "-b", "--register=no",
                    "--keep-unit", "--private-network", "--console=read-only",
                    "-M", self.name, "--system-call-filter=bpf",
                ],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
            )  # fmt: skip
        nspawn = self._nspawn

        def systemd_pid() -> int | None:
            if nspawn.poll() is not None:
                raise AssertionError(f"systemd-nspawn exited: {self.log.read_text()}")
            children = Path(f"/proc/{nspawn.pid}/task/{nspawn.pid}/children")
            pids = children.read_text().split() if children.exists() else []
            return int(pids[0]) if pids else None

        self.pid1 = wait_until(systemd_pid, "the container's systemd", timeout)

        def booted() -> bool:
            state = self.run("systemctl", "is-system-running", check=False).stdout.strip()
            return state in ("running", "degraded")

        wait_until(booted, "the container's boot to finish", timeout)

    def run(
        self,
        *command: str,
        check: bool = True,
        host_network: bool = False,
        input: str | None = None,
        timeout: float = 300,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``command`` in the container (its namespaces, root and cgroup); with
        ``host_network`` in the host's network namespace instead (apt-get reaching a mirror)."""
        namespaces = ["-m", "-u", "-i", "-p", "-C", "-r", "-w"]
        if not host_network:
            namespaces.append("-n")
        result = subprocess.run(
            ["nsenter", "-t", str(self.pid1), *namespaces, *command],
            capture_output=True, text=True, check=False, input=input, timeout=timeout,
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"},
        )  # fmt: skip
        if check and result.returncode != 0:
            raise AssertionError(
                f"in the container, {command} failed ({result.returncode}):\n"
                f"{result.stdout}\n{result.stderr}"
            )
        return result

    def path(self, inside: str) -> Path:
        """Where the host sees the container's file ``inside``."""
        return self.root / inside.lstrip("/")

    def journal(self, *matches: str, unit: str = "virt-bitmapd") -> list[dict[str, Any]]:
        """journald's entries of ``unit`` matching ``FIELD=value`` ``matches``, oldest first."""
        out = self.run("journalctl", "-u", unit, "-o", "json", "--no-pager", *matches).stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def unit_property(self, name: str, unit: str = "virt-bitmapd") -> str:
        return self.run("systemctl", "show", "-P", name, unit).stdout.strip()

    def shutdown(self) -> None:
        nspawn = self._nspawn
        if nspawn is not None and nspawn.poll() is None:
            self.run("systemctl", "poweroff", check=False, timeout=30)
            try:
                nspawn.wait(timeout=30)
            except subprocess.TimeoutExpired:
                nspawn.kill()
                nspawn.wait()
        if os.path.ismount(self.root):
            _run("umount", "-l", str(self.root))
        shutil.rmtree(self.work, ignore_errors=True)
        # /run on this host is not a tmpfs: nspawn's own leftovers stay unless removed
        shutil.rmtree(f"/run/systemd/nspawn/propagate/{self.name}", ignore_errors=True)
        Path(f"/run/systemd/nspawn/unix-export/{self.name}").unlink(missing_ok=True)


def _run(*command: str) -> None:
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise AssertionError(f"{command} failed ({result.returncode}): {result.stderr}")
