"""libvirt's block job types, by the names logs, metrics and ``status`` use."""

from __future__ import annotations

import libvirt

__all__ = ["JOB_TYPES", "LAYERS_CARRIED", "job_name"]

JOB_TYPES = {
    libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_PULL: "pull",
    libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_COPY: "copy",
    libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_COMMIT: "commit",
    libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_ACTIVE_COMMIT: "active_commit",
    libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_BACKUP: "backup",
}


def job_name(job_type: int) -> str:
    return JOB_TYPES.get(job_type, f"unknown_{job_type}")


#: Jobs that take layers out of a chain with their data and bitmaps (a commit into the base, a
#: pull into the top): their completion proves the layers gone were not discarded.
LAYERS_CARRIED = frozenset({"commit", "active_commit", "pull"})
