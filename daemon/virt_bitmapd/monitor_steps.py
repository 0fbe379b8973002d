"""The steps of a change inside a running QEMU, through its monitor: what to undo whatever
happens, the probe that tells whether a base holds every bit already, the base reopened
read-write around a transaction, and the transaction itself, checked afterwards.  Used by the
live reconciliation (``live``) and the top's union (``top_union``)."""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from typing import Any, Protocol

from .domain_xml import Disk, Layer
from .errors import (
    BitmapUnusableAfter,
    QMPError,
    RepairRefused,
    TransactionRefused,
    VirtBitmapdError,
)
from .model import Outcome, Plan, find_bitmap
from .qmp import JSON, PROBE_PREFIX, blockdev_reopen, probe_transaction, remove_bitmaps, transaction
from .qmp_nodes import NodeBitmaps, node_bitmaps, query_nodes

__all__ = ["Monitor", "Undo", "already_consistent", "apply_plan", "run_plan"]


class Monitor(Protocol):
    """Runs one QMP command in a running QEMU; raises QMPError when QEMU answers an error and
    LibvirtFailed when libvirt cannot pass it on."""

    def execute(self, command: JSON) -> Any: ...


class Undo:
    """Steps to run at the end, last registered first, each whatever the others do."""

    def __init__(self, monitor: Monitor) -> None:
        self._monitor = monitor
        self._steps: list[tuple[str, JSON]] = []

    def push(self, what: str, command: JSON) -> None:
        self._steps.append((what, command))

    def pop(self) -> None:
        """Drop the last step: it was done on the main path already."""
        self._steps.pop()

    def run(self) -> list[str]:
        failures = []
        while self._steps:
            what, command = self._steps.pop()
            try:
                self._monitor.execute(command)
            except VirtBitmapdError as error:
                failures.append(f"{what}: {error}")
        return failures


def already_consistent(
    monitor: Monitor, undo: Undo, plan: Plan, base: NodeBitmaps, source_nodes: dict[str, str]
) -> bool:
    if any(merge.create_in_base for merge in plan.merges):
        return False
    base_node = base.node
    probes = {}
    for merge in plan.merges:
        copy = find_bitmap(base.bitmaps, merge.bitmap)
        if copy is None:
            return False
        probes[merge.bitmap] = (f"{PROBE_PREFIX}{secrets.token_hex(6)}", copy.granularity)
    names = [probe for probe, _ in probes.values()]
    monitor.execute(
        probe_transaction(plan, base_node=base_node, source_nodes=source_nodes, probes=probes)
    )
    undo.push(f"remove probes from {base_node}", remove_bitmaps(base_node, names))
    after = node_bitmaps(monitor.execute(query_nodes()), base_node)
    monitor.execute(remove_bitmaps(base_node, names))
    undo.pop()
    return all(
        after.dirty_bytes[probe] == after.dirty_bytes[bitmap]
        for bitmap, (probe, _) in probes.items()
    )


def _backing_node(disk: Disk, base_layer: Layer) -> str | None:
    """The node the base's backing is, exactly; refuses when the chain below is not known."""
    below = disk.layers[disk.layers.index(base_layer) + 1 :]
    if not below:
        if not disk.complete:
            raise RepairRefused(
                base_layer.path,
                "libvirt does not describe the chain below this base, so it cannot be reopened "
                "without changing what the guest reads; not repaired",
            )
        return None
    if below[0].format_node is None:
        raise RepairRefused(
            base_layer.path, f"its backing {below[0].path} has no node libvirt names; not repaired"
        )
    return below[0].format_node


def apply_plan(
    monitor: Monitor,
    undo: Undo,
    plan: Plan,
    disk: Disk,
    *,
    entry: JSON,
    source_nodes: dict[str, str],
) -> Outcome:
    """Apply ``plan`` to the base, whose ``query-named-block-nodes`` entry is ``entry``."""
    base_node = str(entry["node-name"])
    before = node_bitmaps([entry], base_node).dirty_bytes
    base_layer = disk.layer(plan.base)
    assert base_layer is not None and base_layer.storage_node is not None
    read_only = bool(entry.get("ro"))
    if read_only:  # a backing node: its bitmaps cannot be changed until it is writable
        if base_layer.unreproducible or disk.metadata_cache:
            options = ", ".join(base_layer.unreproducible) or "a metadata cache size"
            raise RepairRefused(
                plan.base,
                f"libvirt opened this base with options a reopen cannot repeat ({options}); "
                "not repaired",
            )
        backing = _backing_node(disk, base_layer)

        def reopen(read_only: bool) -> JSON:
            return blockdev_reopen(
                node=base_node,
                file_node=str(base_layer.storage_node),
                backing_node=backing,
                read_only=read_only,
                current=entry,
                discard=disk.discard,
            )

        monitor.execute(reopen(read_only=False))
        undo.push(f"reopen {base_node} read-only", reopen(read_only=True))
    return run_plan(monitor, plan, base_node, source_nodes=source_nodes, before=before)


def run_plan(
    monitor: Monitor,
    plan: Plan,
    node: str,
    *,
    source_nodes: Mapping[str, str],
    before: Mapping[str, int],
) -> Outcome:
    """Apply ``plan`` to ``node`` (the plan's base, writable) as one transaction, then check
    every merged bitmap recording and consistent there.  ``before``: its dirty byte counts."""
    try:
        monitor.execute(transaction(plan, base_node=node, source_nodes=source_nodes))
    except QMPError as error:
        raise TransactionRefused(plan.base, error.description) from error
    after = node_bitmaps(monitor.execute(query_nodes()), node)
    unusable = plan.first_unusable(after.bitmaps)
    if unusable is not None:
        raise BitmapUnusableAfter(plan.base, unusable)
    return Outcome.from_counts(plan, before, after.dirty_bytes)
