"""`virt-bitmapd check`, the pre-backup gate, on a real libvirtd with OS-less QEMU VMs: each
exit status, and answers that come from a look the daemon took after what just happened."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from helpers.images import K64, MiB, dirty_extents, expected
from helpers.libvirt_env import DaemonProcess, Domains, stop_gracefully, virsh
from helpers.scenarios import (
    cp1_lost_at_rest,
    entry_after,
    guest_write,
    is_for,
    running_on_new_image,
    snapshot,
)

pytestmark = pytest.mark.real

LOOKED = "the daemon looked just now"


def check(daemon: DaemonProcess, dom: Any, *args: str) -> tuple[int, dict[str, Any]]:
    """`virt-bitmapd check DOMAIN --json ARGS`: its exit status and answer."""
    command = [sys.executable, "-m", "virt_bitmapd.cli", "check", dom.name(), "--json"]
    result = subprocess.run(
        [*command, "--config", str(daemon.config), *args],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode in (0, 1, 2, 3), result
    answer = json.loads(result.stdout)
    assert answer["exit"] == result.returncode, answer
    return result.returncode, answer


def looks_for_check(daemon: DaemonProcess, dom: Any) -> list[dict[str, Any]]:
    """The looks the daemon finished because ``check`` asked, so far."""
    return [e for e in daemon.entries() if is_for(dom, "look_done")(e) and "check" in e["reasons"]]


def test_a_fresh_checkpoint_is_incremental_and_no_checkpoint_is_full(
    tmp_path: Path, domains: Domains, daemon_factory: Any
) -> None:
    _, _, dom, daemon = running_on_new_image(tmp_path, domains, daemon_factory, "base.qcow2")
    code, answer = check(daemon, dom)
    assert (code, answer["checkpoint"], answer["looked"]) == (1, None, LOOKED), answer
    assert "no checkpoint" in answer["reason"]
    virsh("checkpoint-create-as", dom.name(), "cp1", "--diskspec", "vda")
    guest_write(dom, 1 * MiB, K64, 0x11)
    code, answer = check(daemon, dom, "--checkpoint", "cp1", "--disk", "vda")
    assert code == 0 and answer["looked"] == LOOKED, answer
    (vda,) = answer["disks"]
    assert (vda["name"], vda["bitmap"], vda["backup"], vda["offline_export"]) == (
        "vda",
        "cp1",
        "safe",
        "safe",
    ), vda
    assert len(looks_for_check(daemon, dom)) >= 2
    assert check(daemon, dom, "--checkpoint", "cp9")[0] == 1
    assert check(daemon, dom, "--disk", "vdz")[0] == 3


@pytest.mark.parametrize(
    "expected",
    [("disable", 1, "refused by libvirt"), ("report", 2, "would miss data")],
    ids=["disable", "report"],
)
def test_a_lost_checkpoint_is_full_when_quarantined_and_misses_data_when_only_reported(
    tmp_path: Path, domains: Domains, daemon_factory: Any, expected: tuple[str, int, str]
) -> None:
    policy, code, backup = expected
    daemon = daemon_factory(roots=[tmp_path / "images"])
    options = ("--untrusted", policy)
    dom, _ = cp1_lost_at_rest(tmp_path, domains, daemon, options)
    mark = len(daemon.entries())
    daemon.start(*options)
    startup = lambda e: e.get("event") == "rescan_finished" and e["trigger"] == "startup"  # noqa: E731
    entry_after(daemon, mark, startup, "the startup looks")
    found, answer = check(daemon, dom)
    assert (found, answer["checkpoint"], answer["looked"]) == (code, "cp1", LOOKED), answer
    (vda,) = answer["disks"]
    assert (vda["state"], vda["backup"]) == ("untrusted", backup), vda


def test_a_block_job_is_unknown_and_wait_answers_from_the_look_after_the_commit(
    tmp_path: Path, domains: Domains, daemon_factory: Any
) -> None:
    folder, base, dom, daemon = running_on_new_image(
        tmp_path, domains, daemon_factory, "base.qcow2"
    )
    virsh("checkpoint-create-as", dom.name(), "cp1", "--diskspec", "vda")
    guest_write(dom, 1 * MiB, K64, 0x11)
    top = folder / "s1.qcow2"
    snapshot(dom, top)
    guest_write(dom, 3 * MiB, K64, 0x22)
    virsh("blockcommit", dom.name(), "vda", "--active", "--wait")  # ready, waiting for a pivot
    code, answer = check(daemon, dom)
    assert code == 3 and "block job" in answer["reason"], answer
    started = time.monotonic()
    assert check(daemon, dom, "--wait", "2")[0] == 3  # the job never ends by itself
    assert time.monotonic() - started >= 2
    virsh("blockjob", dom.name(), "vda", "--pivot")
    code, answer = check(daemon, dom, "--wait", "60")
    assert code == 0, answer
    # answered once the look that saw the commit had carried the bits into the base
    reconciled = [e for e in daemon.entries() if is_for(dom, "reconciliation")(e)]
    assert reconciled and reconciled[-1]["result"] in ("reconciled", "already_consistent")
    stop_gracefully(dom)
    assert dirty_extents(base, "cp1") == expected([(1 * MiB, K64), (3 * MiB, K64)])


def test_wait_right_after_the_domain_stops_answers_from_the_look_at_rest(
    tmp_path: Path, domains: Domains, daemon_factory: Any
) -> None:
    """A snapshot, then the domain stopped at once: the top's copy holds only what was
    written since, until a look unites it at rest.  check answers after that look, so an
    offline export of the top's copy (what virtnbdbackup reads) is complete."""
    folder, _, dom, daemon = running_on_new_image(tmp_path, domains, daemon_factory, "base.qcow2")
    virsh("checkpoint-create-as", dom.name(), "cp1", "--diskspec", "vda")
    guest_write(dom, 1 * MiB, K64, 0x11)
    top = folder / "s1.qcow2"
    snapshot(dom, top)
    guest_write(dom, 3 * MiB, K64, 0x22)
    stop_gracefully(dom)
    code, answer = check(daemon, dom, "--wait", "60")
    assert code == 0, answer
    (vda,) = answer["disks"]
    assert vda["offline_export"] == "safe", vda
    assert dirty_extents(top, "cp1") == expected([(1 * MiB, K64), (3 * MiB, K64)])


def test_without_a_daemon_it_judges_read_only_and_says_so(
    tmp_path: Path, domains: Domains, daemon_factory: Any
) -> None:
    _, _, dom, daemon = running_on_new_image(tmp_path, domains, daemon_factory, "base.qcow2")
    virsh("checkpoint-create-as", dom.name(), "cp1", "--diskspec", "vda")
    assert daemon.stop() == 0
    code, answer = check(daemon, dom)
    assert code == 0 and answer["looked"].startswith("judged read-only: no daemon"), answer
