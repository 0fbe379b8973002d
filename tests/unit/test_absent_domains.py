"""Domains libvirt stops listing without an UNDEFINED event (transient domains that stopped)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from structlog.testing import capture_logs

from virt_bitmapd.config import Settings
from virt_bitmapd.observability.metrics import Metrics
from virt_bitmapd.retention import RETENTION
from virt_bitmapd.service.daemon import Daemon


def test_absent_domain_keeps_its_chains_until_the_retention_ends(tmp_path: Path) -> None:
    daemon = Daemon(Settings(state_dir=str(tmp_path)), metrics=Metrics())
    daemon.store.put_disk("u1", name="vm1", disk="vda", chain=("/a",), untrusted={}, bitmaps={})
    with capture_logs() as logs:
        daemon._rescans._absent("u1")
        daemon._rescans._absent("u1")  # said once, not at every rescan
    assert [e["event"] for e in logs] == ["domain_absent"]
    assert daemon.store.known() == ["u1"]
    state_file = tmp_path / "domains" / "u1.json"
    long_ago = time.time() - RETENTION - 60
    os.utime(state_file, (long_ago, long_ago))
    with capture_logs() as logs:
        daemon._rescans._absent("u1")
    assert [(e["event"], e["reason"]) for e in logs] == [("domain_forgotten", "absent")]
    assert daemon.store.known() == []
