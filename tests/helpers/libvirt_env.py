"""A real libvirtd, real OS-less QEMU VMs, and the daemon as a real process, for tests.

Every domain a test defines has a unique name and its images in the test's own folder; it is
destroyed and undefined at teardown, so tests can share one libvirtd and run twice in a row.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import libvirt

REPO = Path(__file__).resolve().parents[2]
ASYNCIO_REPORTS = (
    "Non-thread-safe operation",
    "exception was never retrieved",
    "was never awaited",
    "Task was destroyed but it is pending",
)
URI = "qemu:///system"
QEMU_LOGS = "/var/log/libvirt/qemu"


def start_libvirtd() -> None:
    result = subprocess.run(
        [str(REPO / "scripts" / "libvirt-up.sh")], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"libvirtd could not be started: {result.stderr or result.stdout}")


def connect() -> libvirt.virConnect:
    return libvirt.open(URI)


def domain_type() -> str:
    return "kvm" if os.access("/dev/kvm", os.R_OK | os.W_OK) else "qemu"


def domain_xml(name: str, *disks: Path, fmt: str = "qcow2", kind: str | None = None) -> str:
    devices = "".join(
        f"""
    <disk type='file' device='disk'>
      <driver name='qemu' type='{fmt}'/>
      <source file='{disk}'/>
      <target dev='vd{chr(ord("a") + index)}' bus='virtio'/>
    </disk>"""
        for index, disk in enumerate(disks)
    )
    return f"""
<domain type='{kind or domain_type()}'>
  <name>{name}</name>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices>{devices}
  </devices>
</domain>"""


class Domains:
    """Defines domains for one test and removes them all afterwards."""

    def __init__(self, conn: libvirt.virConnect) -> None:
        self.conn = conn
        self._names: list[str] = []

    def xml(self, *disks: Path, prefix: str = "vbd-test", fmt: str = "qcow2") -> tuple[str, str]:
        """The name and XML of a domain with these disks (of format ``fmt``) as vda, vdb, ...;
        removed at teardown under that name, however the test creates it."""
        name = f"{prefix}-{uuid.uuid4().hex[:8]}"
        self._names.append(name)
        return name, domain_xml(name, *disks, fmt=fmt)

    def define(
        self, *disks: Path, start: bool = False, prefix: str = "vbd-test", fmt: str = "qcow2"
    ) -> Any:
        """A domain with these disks as vda, vdb, ..."""
        _, xml = self.xml(*disks, prefix=prefix, fmt=fmt)
        dom = self.conn.defineXML(xml)
        if start:
            dom.create()
        return dom

    def adopt(self, name: str) -> None:
        """Also remove domain ``name`` at teardown (one renamed by the test)."""
        self._names.append(name)

    def cleanup(self) -> None:
        for name in self._names:
            try:
                dom = self.conn.lookupByName(name)
            except libvirt.libvirtError:
                continue
            persistent = dom.isPersistent()
            if dom.isActive():
                dom.destroy()
            if persistent:  # a transient domain is gone once destroyed
                dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA)
        for name in self._names:  # the QEMU log libvirt kept of each
            Path(QEMU_LOGS, f"{name}.log").unlink(missing_ok=True)


def stop_gracefully(dom: Any, timeout: float = 30) -> None:
    """SIGTERM to QEMU: it closes its images cleanly, storing the bitmaps (an OS-less guest
    cannot answer an ACPI shutdown)."""
    dom.destroyFlags(libvirt.VIR_DOMAIN_DESTROY_GRACEFUL)
    deadline = time.monotonic() + timeout
    while _active(dom):
        assert time.monotonic() < deadline, f"{dom.name()} did not stop"
        time.sleep(0.1)


def _active(dom: Any) -> bool:
    try:
        return bool(dom.isActive())
    except libvirt.libvirtError as error:
        if error.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return False  # a transient domain is gone once stopped
        raise


def virsh(*args: str) -> str:
    result = subprocess.run(
        ["virsh", "-c", URI, *args], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise AssertionError(f"virsh {' '.join(args)} failed: {result.stderr}")
    return result.stdout


class DaemonProcess:
    """`virt-bitmapd run` as a child process whose JSON log lines the test reads."""

    def __init__(
        self, folder: Path, *, roots: list[Path], rescan_interval: float = 3600, uri: str = URI
    ) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.state_dir = folder / "state"
        self.log_path = folder / f"daemon-{uuid.uuid4().hex[:6]}.log"
        self.config = folder / "config.toml"
        roots_toml = ", ".join(json.dumps(str(root)) for root in roots)
        self.config.write_text(
            f"[libvirt]\nuri = {json.dumps(uri)}\n"
            f"[storage]\nroots = [{roots_toml}]\n"
            f"[daemon]\nstate_dir = {json.dumps(str(self.state_dir))}\n"
            f"rescan_interval = {rescan_interval}\n"
            f"control_socket = {json.dumps(str(folder / 'control.sock'))}\n"
            '[metrics]\nlisten = ""\n'
            '[log]\nformat = "json"\nlevel = "debug"\n'
        )
        self.process: subprocess.Popen[bytes] | None = None
        self._returned: set[int] = set()

    def start(self, *extra: str, env: dict[str, str] | None = None) -> DaemonProcess:
        self._log = self.log_path.open("ab")
        # asyncio's debug mode reports any loop call from another thread and any task whose
        # exception nobody retrieved; stop() fails the test on either.
        environment = {**(env or os.environ), "PYTHONASYNCIODEBUG": "1"}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "virt_bitmapd.cli", "run", "--config", str(self.config), *extra],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=environment,
        )
        return self

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def stop(self, timeout: float = 10) -> int:
        if self.process is None:
            return 0
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=timeout)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
            self._log.close()
            self.process = None
        self.assert_no_asyncio_reports()
        return code

    def assert_no_asyncio_reports(self) -> None:
        """Fail on what asyncio's debug mode reports as a bug in the daemon, and on libvirt's
        own error printing (its messages must go through the daemon's logging)."""
        text = self.log_path.read_text(errors="replace")
        for report in ASYNCIO_REPORTS:
            if report in text:
                raise AssertionError(f"asyncio reported {report!r}; log:\n{text}")
        printed = [line for line in text.splitlines() if line.startswith("libvirt: ")]
        assert not printed, f"libvirt printed outside the daemon's logs: {printed}"

    def entries(self) -> list[dict[str, Any]]:
        result = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(entry, dict):
                result.append(entry)
        return result

    def wait_for(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 60, what: str = ""
    ) -> dict[str, Any]:
        """The first log entry matching ``predicate`` that no earlier call returned."""
        deadline = time.monotonic() + timeout
        while True:
            entries = self.entries()
            for index, entry in enumerate(entries):
                if index not in self._returned and predicate(entry):
                    self._returned.add(index)
                    return entry
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(f"the daemon exited; log:\n{self.log_path.read_text()}")
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"no log entry {what} within {timeout} s; log:\n{self.log_path.read_text()}"
                )
            time.sleep(0.1)

    def wait_event(self, event: str, timeout: float = 60, **fields: Any) -> dict[str, Any]:
        def matches(entry: dict[str, Any]) -> bool:
            return entry.get("event") == event and all(entry.get(k) == v for k, v in fields.items())

        return self.wait_for(matches, timeout, what=f"{event} {fields}")


def iter_domains(conn: libvirt.virConnect) -> Iterator[str]:
    for dom in conn.listAllDomains(0):
        yield dom.name()
