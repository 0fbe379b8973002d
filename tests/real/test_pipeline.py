"""A look is a pipeline: followed through on a real libvirtd with real images, from the request
a source makes to the last write, each stage once and in order; and the daemon's own writes are
no news to it."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from helpers.images import run
from helpers.libvirt_env import Domains
from helpers.scenarios import commit_offline, commit_s1_live, entry_after, is_for, tracked

pytestmark = pytest.mark.real

STAGES = ["gather", "decide", "act", "reread", "judge", "effects", "apply"]


def looks_since(daemon: Any, dom: Any, mark: int) -> list[dict[str, Any]]:
    """The looks at the domain's disk whose line came after entry number ``mark``."""
    return [entry for entry in daemon.entries()[mark:] if is_for(dom, "look_done")(entry)]


def test_a_commit_event_walks_the_pipeline_once(
    tmp_path: Path, domains: Domains, daemon_factory: Any
) -> None:
    c, dom, daemon = tracked(tmp_path, domains, daemon_factory, running=True)
    mark = len(daemon.entries())
    commit_s1_live(dom, c)
    daemon.wait_for(is_for(dom, "reconciliation"), what="reconciliation")
    look = daemon.wait_for(
        lambda e: is_for(dom, "look_done")(e) and "event" in e["reasons"], what="the look"
    )
    assert look["stages"] == STAGES, look
    entries = daemon.entries()[mark:]
    order = [e["event"] for e in entries if e.get("domain") == dom.name()]
    # the event, then the reconciliation the look found, then the look's end
    assert order.index("block_job_event") < order.index("reconciliation")
    assert order.index("reconciliation") < order.index("look_done")


def test_a_cold_merge_found_by_the_watch_costs_one_look(
    tmp_path: Path, domains: Domains, daemon_factory: Any
) -> None:
    """The look that reconciles the base at rest writes it (a close after writing, which the
    watch hears): that write is the daemon's own, and no second look follows.  A write by
    anyone else still is looked at."""
    c, dom, daemon = tracked(tmp_path, domains, daemon_factory, running=False)
    images = str(tmp_path / "images")
    daemon.wait_for(lambda e: e.get("event") == "watch_changed" and images in e["added"])
    mark = len(daemon.entries())
    commit_offline(c)
    entry = daemon.wait_for(is_for(dom, "reconciliation"), timeout=10, what="reconciliation")
    assert entry["result"] == "reconciled" and entry["trigger"] == "watch", entry
    time.sleep(3)  # the watch's quiet time several times over: a second look would be done
    looks = looks_since(daemon, dom, mark)
    assert len(looks) == 1, looks
    assert looks[0]["stages"] == STAGES and looks[0]["reasons"] == ["watch"], looks[0]
    # someone else's write to a layer is news
    mark = len(daemon.entries())
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x11 8M 64k", str(c.active))
    entry_after(daemon, mark, is_for(dom, "look_done"), "a look after another writer")
    time.sleep(3)
    looks = looks_since(daemon, dom, mark)
    assert len(looks) == 1 and looks[0]["reasons"] == ["watch"], looks
