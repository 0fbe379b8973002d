"""Operations against the real things: Prometheus, journald, the notify protocol, systemd's
unit checks, and `make install`."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from helpers.libvirt_env import REPO, DaemonProcess, Domains, virsh
from helpers.scenarios import build, commit_offline, is_for, redefine_checkpoint
from virt_bitmapd.observability.logs import message_id

pytestmark = pytest.mark.real

JOURNAL_SOCKET = "/run/systemd/journal/socket"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(condition: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout} s")
        time.sleep(0.2)


def fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return str(response.read().decode())


# ---------------------------------------------------------------- Prometheus


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[Any]:
    """Starts a real Prometheus scraping the targets given to it, every second."""
    processes: list[subprocess.Popen[bytes]] = []

    def start(targets: list[str]) -> str:
        port = free_port()
        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            "scrape_configs:\n  - job_name: virt-bitmapd\n    static_configs:\n"
            f"      - targets: {json.dumps(targets)}\n"
        )
        log = (tmp_path / "prometheus.log").open("wb")
        process = subprocess.Popen(
            [
                "prometheus",
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        processes.append(process)
        url = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            if process.poll() is not None:
                raise AssertionError(
                    f"prometheus exited: {(tmp_path / 'prometheus.log').read_text()}"
                )
            try:
                return "Ready" in fetch(f"{url}/-/ready")
            except OSError:
                return False

        wait_until(ready, 60, "prometheus ready")
        return url

    yield start
    for process in processes:
        process.terminate()
        process.wait(timeout=30)


def dashboard_queries() -> list[str]:
    dashboard = json.loads((REPO / "dashboards" / "virt-bitmapd.json").read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


def alert_expressions() -> list[str]:
    rules = (REPO / "dashboards" / "alerts.yml").read_text()
    return [line.split("expr:", 1)[1].strip() for line in rules.splitlines() if "expr:" in line]


def grafana_to_promql(expr: str) -> str:
    return (
        expr.replace("$instance", ".*").replace("$__rate_interval", "1m").replace("$__range", "5m")
    )


def promtool_query(url: str, expr: str) -> str:
    result = subprocess.run(
        ["promtool", "query", "instant", url, expr], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, f"promtool rejected {expr!r}: {result.stderr}"
    return result.stdout.strip()


def test_every_dashboard_query_and_alert_returns_data_from_a_real_prometheus(
    tmp_path: Path, domains: Domains, daemon_factory: Any, prometheus: Any
) -> None:
    assert (
        subprocess.run(
            ["promtool", "check", "rules", str(REPO / "dashboards" / "alerts.yml")], check=False
        ).returncode
        == 0
    )
    # Daemon A sees a live commit, an offline one it reconciles, and one whose layers are gone.
    port_a, port_b = free_port(), free_port()
    # only reported, neither filled nor quarantined: the lost checkpoint stays untrusted (an
    # incremental from it would miss data) for the panels and alerts
    daemon = daemon_factory().start(f"--metrics-listen=127.0.0.1:{port_a}", "--untrusted", "report")
    live = build(tmp_path / "live")
    live_dom = domains.define(live.active, start=True)
    good = build(tmp_path / "good")
    good_dom = domains.define(good.active)
    lost = build(tmp_path / "lost")
    lost_dom = domains.define(lost.active)
    daemon.signal(signal.SIGHUP)
    for dom in (live_dom, good_dom, lost_dom):
        daemon.wait_for(is_for(dom, "disk_tracked"), what="tracked")
    # Daemon B cannot reach libvirtd at all.
    unreachable = DaemonProcess(
        tmp_path / "b", roots=[tmp_path], uri="qemu+unix:///system?socket=/nonexistent/sock"
    )
    unreachable.start(f"--metrics-listen=127.0.0.1:{port_b}")
    try:
        url = prometheus([f"127.0.0.1:{port_a}", f"127.0.0.1:{port_b}"])
        # Prometheus hands targets to its scrapers only every few seconds: wait for scrapes of
        # both before anything happens, so that increase() sees every change.
        wait_until(lambda: promtool_query(url, "up").count("\n") >= 1, 60, "both targets scraped")
        time.sleep(2)
        virsh("blockcommit", live_dom.name(), "vda", "--active", "--pivot", "--wait")
        commit_offline(good)
        commit_offline(lost)
        lost.layers[1].unlink()
        # a checkpoint of each kind for the per-checkpoint series: complete (0), refused
        # because its bitmap is nowhere (1), and lost with s1 (2)
        virsh("checkpoint-create-as", live_dom.name(), "cp-live", "--diskspec", "vda")
        redefine_checkpoint(good_dom, tmp_path, "ghost", int(time.time()))
        redefine_checkpoint(lost_dom, tmp_path, "cp1", int(time.time()))
        daemon.signal(signal.SIGHUP)
        for dom in (live_dom, good_dom, lost_dom):
            daemon.wait_for(is_for(dom, "reconciliation"), what="reconciliation")

        metrics = fetch(f"http://127.0.0.1:{port_a}/metrics")
        check = subprocess.run(
            ["promtool", "check", "metrics"],
            input=metrics,
            capture_output=True,
            text=True,
            check=False,
        )
        assert check.returncode == 0, check.stdout + check.stderr
        time.sleep(4)  # scrapes after the reconciliations
        empty = []
        for expr in dashboard_queries() + alert_expressions():
            if not promtool_query(url, grafana_to_promql(expr)):
                empty.append(expr)
        assert not empty, f"no data for: {empty}"
        untrusted = promtool_query(url, "virt_bitmapd_untrusted_bitmaps")
        assert lost_dom.name() in untrusted
        verdicts = promtool_query(url, "virt_bitmapd_checkpoint_verdict")
        for dom, checkpoint, verdict in (
            (live_dom, "cp-live", 0),
            (good_dom, "ghost", 1),
            (lost_dom, "cp1", 2),
        ):
            line = next(v for v in verdicts.splitlines() if f'domain="{dom.name()}"' in v)
            assert f'checkpoint="{checkpoint}"' in line and f"=> {verdict} @" in line, line
    finally:
        unreachable.stop()


# ---------------------------------------------------------------- journald


def journald_listening() -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(JOURNAL_SOCKET)
        except OSError:  # absent, or left behind by a journald that is gone
            return False
    return True


@pytest.fixture(scope="session")
def journald() -> Iterator[None]:
    """A real systemd-journald: the system's, or one started here (and stopped after)."""
    started = None
    # A socket file alone proves nothing: a journald that was stopped leaves it behind.
    if not journald_listening():
        os.makedirs(os.path.dirname(JOURNAL_SOCKET), exist_ok=True)
        started = subprocess.Popen(
            ["/lib/systemd/systemd-journald"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_until(journald_listening, 20, "journald listening on its socket")
    yield
    if started is not None:
        started.terminate()
        started.wait(timeout=20)


def journal(*filters: str) -> list[dict[str, Any]]:
    result = subprocess.run(
        ["journalctl", "--no-pager", "-o", "json", *filters],
        capture_output=True,
        text=True,
        check=False,
    )
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def test_journald_gets_native_fields(
    tmp_path: Path, domains: Domains, daemon_factory: Any, journald: None
) -> None:
    c = build(tmp_path / "images")
    dom = domains.define(c.active)
    daemon = daemon_factory().start("--log-format=journal")
    wait_until(
        lambda: journal(f"DOMAIN={dom.name()}", f"MESSAGE_ID={message_id('disk_tracked')}"),
        30,
        "disk_tracked in the journal",
    )
    commit_offline(c)
    daemon.signal(signal.SIGHUP)
    entries = wait_until(
        lambda: journal(f"DOMAIN={dom.name()}", f"MESSAGE_ID={message_id('reconciliation')}"),
        30,
        "reconciliation in the journal",
    )
    entry = entries[-1]
    assert entry["SYSLOG_IDENTIFIER"] == "virt-bitmapd"
    assert entry["PRIORITY"] == "6"
    assert entry["DISK"] == "vda" and entry["RESULT"] == "reconciled"
    assert entry["BASE"] == str(c.layers[0])
    assert entry["MESSAGE"].startswith("reconciliation: ")
    assert journal("-t", "virt-bitmapd", "RESULT=reconciled", f"DOMAIN={dom.name()}")


# ---------------------------------------------------------------- notify protocol


def test_notify_socket_gets_ready_watchdog_and_stopping(tmp_path: Path, domains: Domains) -> None:
    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(path)
        server.settimeout(30)
        daemon = DaemonProcess(tmp_path, roots=[tmp_path])
        env = dict(os.environ, NOTIFY_SOCKET=path, WATCHDOG_USEC="1000000")
        daemon._log = daemon.log_path.open("ab")
        daemon.process = subprocess.Popen(
            [sys.executable, "-m", "virt_bitmapd.cli", "run", "--config", str(daemon.config)],
            stdout=daemon._log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        received: list[str] = []

        def saw(word: str) -> bool:
            while not any(word in message for message in received):
                received.append(server.recv(4096).decode())
            return True

        saw("READY=1")
        saw("WATCHDOG=1")
        started = time.monotonic()
        code = daemon.stop()
        saw("STOPPING=1")
        assert code == 0 and time.monotonic() - started < 10
    ready = next(m for m in received if "READY=1" in m)
    assert "STATUS=connected to qemu:///system" in ready


# ---------------------------------------------------------------- systemd unit and install


def unit_with_binary(tmp_path: Path, binary: str) -> Path:
    unit = tmp_path / "virt-bitmapd.service"
    text = (REPO / "systemd" / "virt-bitmapd.service").read_text()
    unit.write_text(text.replace("/usr/local/bin/virt-bitmapd", binary))
    return unit


def test_unit_verifies_and_is_hardened(tmp_path: Path) -> None:
    unit = unit_with_binary(tmp_path, str(Path(sys.executable).parent / "virt-bitmapd"))
    verify = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, check=False
    )
    assert verify.returncode == 0 and not verify.stderr.strip(), verify.stderr
    security = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", str(unit)],
        capture_output=True,
        text=True,
        check=False,
    )
    exposure = re.search(r"Overall exposure level for \S+: (\d+\.\d)", security.stdout)
    assert exposure is not None, security.stdout + security.stderr
    assert float(exposure.group(1)) <= 1.5


def test_make_install_and_uninstall(tmp_path: Path) -> None:
    root = tmp_path / "root"
    make = ["make", "-C", str(REPO), f"DESTDIR={root}"]
    result = subprocess.run([*make, "install"], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    venv_binary = root / "usr/local/lib/virt-bitmapd/bin/virt-bitmapd"
    version = subprocess.run(
        [str(venv_binary), "--version"], capture_output=True, text=True, check=False
    )
    assert version.returncode == 0 and "virt-bitmapd" in version.stdout
    assert (
        os.readlink(root / "usr/local/bin/virt-bitmapd")
        == "/usr/local/lib/virt-bitmapd/bin/virt-bitmapd"
    )
    for path in (
        "etc/systemd/system/virt-bitmapd.service",
        "etc/virt-bitmapd/config.toml",
        "usr/local/share/virt-bitmapd/virt-bitmapd.json",
        "usr/local/share/virt-bitmapd/alerts.yml",
        "usr/local/share/virt-bitmapd/virtnbdbackup-checked",
        "usr/local/lib/systemd/catalog/virt-bitmapd.catalog",
    ):
        assert (root / path).is_file(), path
    config = root / "etc/virt-bitmapd/config.toml"
    config.write_text(config.read_text() + "\n# mine\n")
    assert subprocess.run([*make, "install"], capture_output=True, check=False).returncode == 0
    assert config.read_text().endswith("# mine\n")  # an existing config is kept
    check = subprocess.run(
        [str(venv_binary), "check-config", str(config)], capture_output=True, check=False
    )
    assert check.returncode == 0
    assert subprocess.run([*make, "uninstall"], capture_output=True, check=False).returncode == 0
    assert not (root / "etc/systemd/system/virt-bitmapd.service").exists()
    assert not (root / "usr/local/lib/virt-bitmapd").exists()
    shutil.rmtree(root)
