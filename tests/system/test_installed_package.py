"""The Debian package under a real systemd (PID 1), with a real libvirtd and OS-less VMs.

One Debian 12 machine is booted (systemd-nspawn) for the whole module; the package built from
this tree by ``make deb`` is installed there with apt, and the tests check what a host
administrator would, in the order an administrator meets them: the service started by the
package, reload, the real work (a cold merge and a live commit), its metrics, its sandbox, the
watchdog, stop, an upgrade, then remove and purge. Each test leaves the service running, but the
last. Never skipped: if the machine cannot be built or booted, the tests fail and say why.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers.container import Container, prepare_rootfs, wait_until
from helpers.images import ChainBuilder, run
from helpers.libvirt_env import REPO, domain_xml
from helpers.scenarios import assert_base_holds_the_data, build

pytestmark = pytest.mark.system

IMAGES = "/var/lib/libvirt/images"
STATE = "/var/lib/virt-bitmapd"
CONFIG = "/etc/virt-bitmapd/config.toml"
UPGRADE_VERSION = "0.1.0+rebuild1"


@dataclass
class System:
    machine: Container
    package: Path  # the .deb on the host
    source: Path  # the tree it was built from (make deb's copy)


def build_package(folder: Path) -> tuple[Path, Path]:
    result = subprocess.run(
        ["make", "-C", str(REPO), "deb", f"DEBDIR={folder}"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, f"make deb failed:\n{result.stdout[-3000:]}\n{result.stderr}"
    (package,) = folder.glob("virt-bitmapd_*_all.deb")
    return package, folder / "src"


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    rootfs = prepare_rootfs()
    package, source = build_package(tmp_path_factory.mktemp("deb"))
    machine = Container(
        rootfs, tmp_path_factory.mktemp("machine"), f"vbd-sys-{uuid.uuid4().hex[:6]}"
    )
    try:
        machine.boot()
        install(machine, package)
        yield System(machine, package, source)
    finally:
        machine.shutdown()


def install(machine: Container, package: Path) -> None:
    """``apt-get install ./PACKAGE`` in the machine: offline, every dependency is there."""
    shutil.copy(package, machine.path(f"/root/{package.name}"))
    machine.run(
        "env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "install", "-y", "-q",
        "--no-install-recommends", f"/root/{package.name}",
    )  # fmt: skip


def active(machine: Container) -> bool:
    return machine.unit_property("ActiveState") == "active"


def journal_count(machine: Container, *matches: str) -> int:
    return len(machine.journal(*matches))


def wait_for_entry(
    machine: Container, *matches: str, after: int = 0, timeout: float = 60
) -> dict[str, object]:
    """The first journal entry of the service matching ``matches`` beyond the first ``after``."""

    def found() -> dict[str, object] | None:
        entries = machine.journal(*matches)
        return entries[after] if len(entries) > after else None

    return wait_until(found, f"a journal entry {' '.join(matches)}", timeout)


def inside(machine: Container, host_path: Path) -> str:
    """The path the machine knows ``host_path`` by."""
    return "/" + str(host_path.relative_to(machine.root))


def chain_in_machine(machine: Container, name: str) -> ChainBuilder:
    """The usual test chain (base, s1, active; cp1..cp3 with known writes), built with the
    host's QEMU tools in the machine's storage root, backing files named as the machine sees
    them."""
    chain = build(machine.path(f"{IMAGES}/{name}"))
    for lower, upper in zip(chain.layers, chain.layers[1:], strict=False):
        run("qemu-img", "rebase", "-u", "-b", inside(machine, lower), "-F", "qcow2", str(upper))
    return chain


def tracked_in_machine(machine: Container, name: str, *, start: bool) -> ChainBuilder:
    """The usual chain, an OS-less domain ``name`` on it in the machine, known to the service."""
    chain = chain_in_machine(machine, name)
    xml = domain_xml(name, Path(inside(machine, chain.active)), kind="qemu")
    machine.path(f"/root/{name}.xml").write_text(xml)
    machine.run("virsh", "-q", "define", f"/root/{name}.xml")
    if start:
        machine.run("virsh", "-q", "start", name)
    wait_for_entry(machine, "EVENT=disk_tracked", f"DOMAIN={name}")
    return chain


# ---------------------------------------------------------------------------------- the tests


def test_apt_installs_enables_and_starts_the_service(system: System) -> None:
    m = system.machine
    wait_until(lambda: active(m), "the service to be active")
    assert m.unit_property("Type") == "notify"  # active means READY=1 was received
    assert m.run("systemctl", "is-enabled", "virt-bitmapd").stdout.strip() == "enabled"
    status = wait_until(
        lambda: (s := m.unit_property("StatusText")).startswith("connected") and s,
        "the STATUS line of a connected daemon",
    )
    assert status == "connected to qemu:///system", status
    assert wait_for_entry(m, "EVENT=daemon_started")["STATE_DIR"] == STATE
    conffiles = m.run("dpkg-query", "-W", "-f=${Conffiles}", "virt-bitmapd").stdout
    assert CONFIG in conffiles
    assert m.path(STATE).is_dir() and oct(m.path(STATE).stat().st_mode & 0o777) == "0o700"
    wrapper = m.path("/usr/share/virt-bitmapd/virtnbdbackup-checked")
    assert wrapper.is_file() and wrapper.stat().st_mode & 0o111, "the wrapper is not executable"
    assert "virt-bitmapd" in m.run("journalctl", "--list-catalog", "--no-pager").stdout
    # the installed unit is the one the package rewrote for /usr/bin, valid and confined
    unit = "/lib/systemd/system/virt-bitmapd.service"
    assert "ExecStart=/usr/bin/virt-bitmapd run" in m.path(unit).read_text()
    verify = m.run("systemd-analyze", "verify", unit, check=False)
    assert verify.returncode == 0 and not verify.stderr.strip(), verify.stderr
    security = m.run("systemd-analyze", "security", "--no-pager", "virt-bitmapd").stdout
    exposure = float(security.rsplit("Overall exposure level for", 1)[1].split(":")[1].split()[0])
    assert exposure <= 1.5, security[-400:]


def test_reload_rescans(system: System) -> None:
    m = system.machine
    before = journal_count(m, "EVENT=rescan_requested", "TRIGGER=manual")
    pid = m.unit_property("MainPID")
    m.run("systemctl", "reload", "virt-bitmapd")
    wait_for_entry(m, "EVENT=rescan_requested", "TRIGGER=manual", after=before)
    assert m.unit_property("MainPID") == pid and active(m)


def test_a_cold_merge_with_qemu_img_commit_is_reconciled(system: System) -> None:
    m = system.machine
    name = "vbd-sys-cold"
    chain = tracked_in_machine(m, name, start=False)
    base, s1, active_layer = (inside(m, layer) for layer in chain.layers)
    # oVirt's cold merge, in the machine: commit s1 into base, rebase the active layer on base;
    # the service's directory watch (inotify, under its sandbox) sees it, no rescan needed
    m.run("qemu-img", "commit", "-q", s1)
    m.run("qemu-img", "rebase", "-u", "-b", base, "-F", "qcow2", active_layer)
    entry = wait_for_entry(m, "RESULT=reconciled", f"DOMAIN={name}", timeout=30)
    assert entry["BASE"] == base and entry["EVENT"] == "reconciliation", entry
    assert entry["TRIGGER"] == "watch", entry
    assert_base_holds_the_data(chain)


def test_a_live_commit_is_verified(system: System) -> None:
    m = system.machine
    name = "vbd-sys-live"
    chain = tracked_in_machine(m, name, start=True)
    base, s1, _ = (inside(m, layer) for layer in chain.layers)
    m.run("virsh", "blockcommit", name, "vda", "--top", s1, "--base", base, "--wait")
    entry = wait_for_entry(m, "EVENT=reconciliation", f"DOMAIN={name}")
    assert entry["RESULT"] == "already_consistent" and entry["TRIGGER"] == "event", entry
    # the gate asks the service for a look through its socket in /run/virt-bitmapd
    m.run("virsh", "-q", "checkpoint-create-as", name, "gate", "--diskspec", "vda")
    gate = m.run("virt-bitmapd", "check", name, "--json", check=False)
    answer = json.loads(gate.stdout)
    assert gate.returncode == 0 and answer["looked"] == "the daemon looked just now", gate
    assert m.run("stat", "-c", "%a", "/run/virt-bitmapd").stdout.strip() == "700"
    m.run("virsh", "-q", "destroy", name)
    assert_base_holds_the_data(chain)


def restart_with(machine: Container, service_section: str | None) -> None:
    """The service restarted with ``service_section`` (lines of a [Service] section) as a
    drop-in, or as packaged when None."""
    dropin = machine.path("/etc/systemd/system/virt-bitmapd.service.d/test.conf")
    if service_section is not None:
        dropin.parent.mkdir(parents=True, exist_ok=True)
        dropin.write_text(f"[Service]\n{service_section}")
    else:
        dropin.unlink(missing_ok=True)
    machine.run("systemctl", "daemon-reload")
    machine.run("systemctl", "restart", "virt-bitmapd")
    wait_until(lambda: active(machine), "the service to be active again")


def test_journalctl_x_explains_a_quarantine(system: System) -> None:
    """A cold merge while the service was stopped, the merged layer deleted: its bits are lost.
    Under untrusted = "disable" the bitmaps are quarantined, and journalctl -x shows what that
    means from the catalog the package installed."""
    m = system.machine
    name = "vbd-sys-lost"
    chain = tracked_in_machine(m, name, start=False)
    base, s1, active_layer = (inside(m, layer) for layer in chain.layers)
    m.run("systemctl", "stop", "virt-bitmapd")
    m.run("qemu-img", "commit", "-q", s1)
    m.run("qemu-img", "rebase", "-u", "-b", base, "-F", "qcow2", active_layer)
    m.run("rm", s1)
    restart_with(m, "ExecStart=\nExecStart=/usr/bin/virt-bitmapd run --untrusted disable\n")
    try:
        wait_for_entry(m, "EVENT=checkpoint_quarantined", f"DOMAIN={name}", timeout=30)
        explained = m.run(
            "journalctl", "-x", "--no-pager", "-u", "virt-bitmapd", "EVENT=checkpoint_quarantined"
        ).stdout
        assert f"Subject: Checkpoints of {name} vda were quarantined" in explained, explained
        assert "libvirt now refuses an incremental backup from these checkpoints" in explained
    finally:
        restart_with(m, None)
    m.run("virsh", "-q", "undefine", name)


def test_the_readmes_service_commands_work_as_written(system: System) -> None:
    """What the README shows a newcomer to try on the installed service, run as written."""
    m = system.machine
    before = journal_count(m, "EVENT=rescan_requested", "TRIGGER=manual")
    m.run("sh", "-c", "systemctl reload virt-bitmapd")
    wait_for_entry(m, "EVENT=rescan_requested", "TRIGGER=manual", after=before)
    handled = m.run("sh", "-c", "journalctl -u virt-bitmapd EVENT=reconciliation").stdout
    assert "vbd-sys-cold" in handled and "vbd-sys-live" in handled, handled
    metrics = "curl -s 127.0.0.1:9411/metrics | grep '^virt_bitmapd_reconciliations_total'"
    counted = m.run("sh", "-c", metrics).stdout
    assert 'result="reconciled"' in counted and 'result="already_consistent"' in counted, counted


PROBE = """
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3).close()
    print("connected")
except OSError as error:
    print(type(error).__name__)
"""


def test_metrics_answer_on_loopback_and_nothing_else_is_reachable(system: System) -> None:
    m = system.machine
    fetch = "import urllib.request as u; print(u.urlopen('http://127.0.0.1:9411/metrics').read())"
    assert "virt_bitmapd_reconciliations_total" in m.run("python3", "-c", fetch).stdout
    listening = m.run("ss", "-Hltn", "sport = :9411").stdout.split()
    assert "127.0.0.1:9411" in listening and "0.0.0.0:9411" not in listening, listening
    # a non-loopback address in the machine, and something listening on it
    m.run("ip", "addr", "add", "10.99.0.1/32", "dev", "lo")
    m.run("systemd-run", "--unit=vbd-listener", "python3", "-m", "http.server",
          "--bind", "10.99.0.1", "8099")  # fmt: skip
    try:
        wait_until(
            lambda: (
                m.run("python3", "-c", PROBE, "10.99.0.1", "8099").stdout.strip() == "connected"
            ),
            "the listener (reachable from outside the service)",
        )
        # the same connection made from inside the service's own cgroup, where its
        # IPAddressDeny=any / IPAddressAllow=localhost apply
        cgroup = "/sys/fs/cgroup/system.slice/virt-bitmapd.service/cgroup.procs"
        in_service = f'echo $$ > {cgroup} && exec python3 -c "$1" "$2" "$3"'
        refused = m.run("sh", "-c", in_service, "probe", PROBE, "10.99.0.1", "8099")
        # the filter drops the packets: EPERM, or for TCP a SYN that never gets through
        assert refused.stdout.strip() in ("PermissionError", "TimeoutError"), refused
        loopback = m.run("sh", "-c", in_service, "probe", PROBE, "127.0.0.1", "9411")
        assert loopback.stdout.strip() == "connected", loopback
    finally:
        m.run("systemctl", "stop", "vbd-listener", check=False)
        m.run("ip", "addr", "del", "10.99.0.1/32", "dev", "lo", check=False)


def status_field(machine: Container, pid: str, field: str) -> str:
    for line in machine.run("cat", f"/proc/{pid}/status").stdout.splitlines():
        if line.startswith(f"{field}:"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def test_the_sandbox_is_applied_to_the_running_service(system: System) -> None:
    m = system.machine
    pid = m.unit_property("MainPID")
    for capabilities in ("CapEff", "CapPrm", "CapBnd", "CapAmb"):
        assert int(status_field(m, pid, capabilities), 16) == 0, capabilities
    assert status_field(m, pid, "NoNewPrivs") == "1"
    assert status_field(m, pid, "Seccomp") == "2"

    def touch(path: str) -> subprocess.CompletedProcess[str]:
        """Create and remove a file in the service's own view of the file system."""
        return m.run("nsenter", "-t", pid, "-m", "sh", "-c", 'touch "$1" && rm "$1"', "-", path,
                     check=False)  # fmt: skip

    for writable in (f"{STATE}/probe", f"{IMAGES}/probe"):
        result = touch(writable)
        assert result.returncode == 0, (writable, result.stderr)
    for read_only in ("/etc/probe", "/usr/probe", "/var/lib/probe", "/var/lib/libvirt/probe"):
        result = touch(read_only)
        assert "Read-only file system" in result.stderr, (read_only, result.stderr)
    assert touch("/root/probe").returncode != 0  # ProtectHome: not even there


def test_a_stalled_daemon_is_killed_by_the_watchdog_and_restarted(system: System) -> None:
    m = system.machine
    restart_with(m, "WatchdogSec=3s\nTimeoutAbortSec=3s\nRestartSec=1s\n")
    try:
        time.sleep(6)  # two watchdog periods: a healthy daemon pings and is left alone
        pid, restarts = m.unit_property("MainPID"), int(m.unit_property("NRestarts"))
        assert active(m)
        m.run("kill", "-STOP", pid)  # its event loop (and everything else) stops
        wait_until(
            lambda: int(m.unit_property("NRestarts")) > restarts and active(m),
            "systemd to kill and restart the stalled service",
        )
        assert m.unit_property("MainPID") != pid
        said = [str(e.get("MESSAGE")) for e in m.journal()]
        assert any("Watchdog timeout" in line for line in said), said[-10:]
        assert any("Failed with result 'watchdog'" in line for line in said), said[-10:]
    finally:
        restart_with(m, None)


def test_stop_is_quick_and_clean(system: System) -> None:
    m = system.machine
    stopped_before = journal_count(m, "EVENT=daemon_stopped")
    started = time.monotonic()
    m.run("systemctl", "stop", "virt-bitmapd")
    took = time.monotonic() - started
    assert took <= 10, f"systemctl stop took {took:.1f} s"
    assert m.unit_property("ActiveState") == "inactive"
    assert m.unit_property("Result") == "success"
    wait_for_entry(m, "EVENT=daemon_stopped", after=stopped_before)
    m.run("systemctl", "start", "virt-bitmapd")
    assert active(m)


def rebuilt(system: System, folder: Path) -> Path:
    """The same tree packaged again under a higher version, as an upgrade arrives."""
    source = folder / "src"
    shutil.copytree(system.source, source, ignore=shutil.ignore_patterns("debian/virt-bitmapd"))
    changelog = source / "debian" / "changelog"
    entry = (
        f"virt-bitmapd ({UPGRADE_VERSION}) unstable; urgency=medium\n\n"
        "  * Rebuilt to test upgrades.\n\n"
        " -- virt-bitmapd maintainers <maintainers@virt-bitmapd.invalid>  "
        "Fri, 27 Nov 2026 12:00:00 +0000\n\n"
    )
    changelog.write_text(entry + changelog.read_text())
    result = subprocess.run(
        ["dpkg-buildpackage", "-us", "-uc", "-b"], cwd=source, capture_output=True, text=True,
        check=False, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    return folder / f"virt-bitmapd_{UPGRADE_VERSION}_all.deb"


def known_chains(machine: Container) -> list[str]:
    """The daemon's state files (one per domain), not the temporary ones it writes them with."""
    return sorted(p.name for p in machine.path(STATE).rglob("*.json") if p.is_file())


def test_an_upgrade_keeps_config_and_state_and_restarts(system: System, tmp_path: Path) -> None:
    m = system.machine
    state_files = known_chains(m)
    assert state_files, "the earlier tests' domains left no state"
    config = m.path(CONFIG)
    config.write_text(config.read_text() + "\n# changed by the administrator\n")
    pid = m.unit_property("MainPID")
    install(m, rebuilt(system, tmp_path))
    version = m.run("dpkg-query", "-W", "-f=${Version}", "virt-bitmapd").stdout
    assert version == UPGRADE_VERSION
    wait_until(lambda: active(m), "the upgraded service to be active")
    assert m.unit_property("MainPID") != pid  # restarted on the new code
    assert config.read_text().endswith("# changed by the administrator\n")
    assert known_chains(m) == state_files


def test_remove_stops_the_service_and_purge_removes_the_state(system: System) -> None:
    m = system.machine
    apt = ("env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "-y", "-q")
    m.run(*apt, "remove", "virt-bitmapd")
    assert m.unit_property("ActiveState") == "inactive"
    assert m.path(STATE).is_dir() and m.path(CONFIG).is_file()  # remove keeps both
    m.run(*apt, "purge", "virt-bitmapd")
    assert not m.path(STATE).exists() and not m.path("/etc/virt-bitmapd").exists()
    assert "virt-bitmapd" not in m.run("dpkg-query", "-W", "-f=${Package}\n").stdout.split()
