"""Chains, plans and outcomes as JSON-ready dicts and as text for people.  Pure."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import VirtBitmapdError
from .healing import HealPlan
from .health import CheckpointHealth
from .model import Bitmap, Chain, Image, Outcome, Plan
from .offline_export import OfflineExport
from .planner import chain_problems
from .qmp import JSON

if TYPE_CHECKING:
    from .status import HostStatus

__all__ = [
    "chain_json",
    "chain_text",
    "error_json",
    "heal_json",
    "heal_text",
    "plan_json",
    "plan_text",
    "status_json",
    "status_text",
]


def _bitmap_json(bitmap: Bitmap) -> JSON:
    return {
        "name": bitmap.name,
        "granularity": bitmap.granularity,
        "recording": bitmap.recording,
        "persistent": bitmap.persistent,
        "inconsistent": bitmap.inconsistent,
    }


def _image_json(image: Image, validity: dict[str, JSON]) -> JSON:
    return {
        "path": image.path,
        "format": image.format,
        "virtual_size": image.virtual_size,
        "bitmaps": [
            {**_bitmap_json(bitmap), "chain_valid": validity[bitmap.name]["valid"]}
            for bitmap in image.bitmaps
        ],
    }


def chain_validity(chain: Chain) -> dict[str, JSON]:
    """For every bitmap name in the chain: is its chain valid from the top (libvirt's rule)?"""
    validity: dict[str, JSON] = {}
    for name, problem in chain_problems(chain.images).items():
        if problem is None:
            validity[name] = {"valid": True}
        else:
            reason, where = problem
            validity[name] = {"valid": False, "reason": reason.value, "image": where}
    return validity


def chain_json(chain: Chain, *, open_elsewhere: bool = False) -> JSON:
    """``images``: every layer, top first, with its bitmaps (``chain_valid`` tells whether the
    bitmap's chain from the top is valid); ``bitmaps``: per name, the verdict and its reason."""
    validity = chain_validity(chain)
    return {
        "top": chain.top.path,
        "open_elsewhere": open_elsewhere,
        "images": [_image_json(image, validity) for image in chain],
        "bitmaps": validity,
    }


def _flags(bitmap: Bitmap) -> str:
    flags = ["recording" if bitmap.recording else "disabled"]
    if bitmap.inconsistent:
        flags.append("inconsistent")
    if not bitmap.persistent:
        flags.append("transient")
    return ", ".join(flags)


def chain_text(chain: Chain, *, open_elsewhere: bool = False) -> str:
    lines = []
    for depth, image in enumerate(chain):
        lines.append(f"{'  ' * depth}{image.path} ({image.format}, {image.virtual_size} bytes)")
        for bitmap in image.bitmaps:
            lines.append(
                f"{'  ' * depth}  bitmap {bitmap.name!r}: granularity {bitmap.granularity}, "
                f"{_flags(bitmap)}"
            )
    validity = chain_validity(chain)
    lines.append("checkpoint bitmaps (validity from the top, libvirt's rule):")
    if not validity:
        lines.append("  none")
    for name, verdict in validity.items():
        if verdict["valid"]:
            lines.append(f"  {name!r}: valid")
        else:
            lines.append(f"  {name!r}: INVALID, {verdict['reason']} in {verdict['image']}")
    if open_elsewhere:
        lines.append(
            "note: an image of this chain is open in another process; in-use flags are stale"
        )
    return "\n".join(lines)


def plan_json(plan: Plan, outcome: Outcome | None = None) -> JSON:
    effects = {merge.bitmap: merge for merge in outcome.merges} if outcome else {}
    merges = []
    for merge in plan.merges:
        entry: JSON = {
            "bitmap": merge.bitmap,
            "granularity": merge.granularity,
            "create_in_base": merge.create_in_base,
            "sources": list(merge.sources),
        }
        effect = effects.get(merge.bitmap)
        if effect is not None:
            entry["dirty_bytes_before"] = effect.dirty_bytes_before
            entry["dirty_bytes_after"] = effect.dirty_bytes_after
        merges.append(entry)
    return {
        "top": plan.top,
        "base": plan.base,
        "merges": merges,
        "skipped": [
            {"bitmap": skip.bitmap, "image": skip.image, "reason": skip.reason.value}
            for skip in plan.skipped
        ],
    }


def plan_text(plan: Plan, outcome: Outcome | None = None) -> str:
    effects = {merge.bitmap: merge for merge in outcome.merges} if outcome else {}
    lines = [f"commit {plan.top} -> {plan.base}"]
    for merge in plan.merges:
        action = "add + merge" if merge.create_in_base else "merge"
        line = f"  {action} {merge.bitmap!r} from {len(merge.sources)} layer(s)"
        effect = effects.get(merge.bitmap)
        if effect is not None:
            line += f": {effect.dirty_bytes_before} -> {effect.dirty_bytes_after} dirty bytes"
        lines.append(line)
    for skip in plan.skipped:
        lines.append(f"  skip {skip.bitmap!r}: {skip.reason.value} in {skip.image}")
    return "\n".join(lines)


def error_json(error: VirtBitmapdError) -> JSON:
    return {
        "kind": error.kind,
        "message": str(error),
        "retryable": error.retryable,
        "image": getattr(error, "image", None),
        "bitmap": getattr(error, "bitmap", None),
    }


def _health_json(entry: CheckpointHealth) -> JSON:
    return {
        "checkpoint": entry.checkpoint,
        "bitmap": entry.bitmap,
        "state": entry.state.value,
        "next_backup": entry.next_backup.value,
        "reason": entry.reason,
        "layer": entry.layer,
        "offline_backup": entry.offline.value,
        "offline_reason": entry.offline_reason,
    }


def status_json(host: HostStatus) -> JSON:
    """Per domain and disk, each checkpoint (and each bitmap no checkpoint names) with its
    state, what the next incremental backup from it does, and why."""
    return {
        "complete": host.complete,
        "memory_error": host.memory_error,
        "domains": [
            {
                "name": domain.name,
                "uuid": domain.uuid,
                "running": domain.running,
                "error": domain.error,
                "skipped": [{"disk": disk, "reason": why} for disk, why in domain.skipped],
                "disks": [
                    {
                        "disk": disk.disk,
                        "chain": list(disk.chain),
                        "error": disk.error,
                        "checkpoints": [_health_json(entry) for entry in disk.checkpoints],
                    }
                    for disk in domain.disks
                ],
            }
            for domain in host.domains
        ],
    }


def status_text(host: HostStatus) -> str:
    lines = []
    if host.memory_error:
        lines.append(f"note: virt-bitmapd's memory: {host.memory_error}; bitmaps it distrusts")
        lines.append("      are not shown as untrusted")
    for domain in host.domains:
        lines.append(f"{domain.name} ({'running' if domain.running else 'shut off'})")
        if domain.error:
            lines.append(f"  error: {domain.error}")
        for disk in domain.disks:
            layers = len(disk.chain)
            top = disk.chain[0] if disk.chain else "?"
            lines.append(
                f"  {disk.disk}: {top}" + (f" (+{layers - 1} below)" if layers > 1 else "")
            )
            if disk.error:
                lines.append(f"    error: {disk.error}")
                continue
            if not disk.checkpoints:
                lines.append("    no checkpoints")
            for entry in disk.checkpoints:
                name = entry.checkpoint or f"(bitmap {entry.bitmap})"
                line = f"    {name:<20} {entry.state.value:<14} {entry.next_backup.value:<19}"
                lines.append((line + " " + entry.reason).rstrip())
                if entry.offline not in (OfflineExport.NONE, OfflineExport.AFTER_JOB) and (
                    entry.offline.value != entry.next_backup.value or entry.offline_reason
                ):
                    why = f" ({entry.offline_reason})" if entry.offline_reason else ""
                    lines.append(f"    {'':<35} offline export: {entry.offline.value}{why}")
        for target, why in domain.skipped:
            lines.append(f"  {target}: skipped: {why}")
    return "\n".join(lines) if lines else "no domains"


def heal_json(plan: HealPlan) -> JSON:
    return {
        "healed": [
            {"image": step.image, "bitmap": step.bitmap, "granularity": step.granularity}
            for step in plan.steps
        ],
        "refused": [
            {"bitmap": refusal.bitmap, "reason": refusal.reason, "layer": refusal.layer}
            for refusal in plan.refused
        ],
    }


def heal_text(top: str, plan: HealPlan) -> str:
    lines = [f"heal {top}"]
    for step in plan.steps:
        lines.append(
            f"  {step.bitmap!r}: rebuilt in {step.image} from its allocated clusters "
            f"(granularity {step.granularity})"
        )
    for refusal in plan.refused:
        lines.append(f"  {refusal.bitmap!r}: refused: {refusal.reason}")
    if not plan.steps and not plan.refused:
        lines.append("  every bitmap's chain is valid")
    return "\n".join(lines)
