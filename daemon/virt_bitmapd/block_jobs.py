"""libvirt's block job types, by the names logs, metrics and ``status`` use."""

from __future__ import annotations

import libvirt

__all__ = ["JOB_TYPES", "job_name"]

JOB_TYPES = {
    libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_PULL: "pull",
    libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_COPY: "copy",
    libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_COMMIT: "commit",
    libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_ACTIVE_COMMIT: "active_commit",
    libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_BACKUP: "backup",
}


def job_name(job_type: int) -> str:
    return JOB_TYPES.get(job_type, f"unknown_{job_type}")
