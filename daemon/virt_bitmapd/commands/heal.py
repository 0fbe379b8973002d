"""``virt-bitmapd heal IMAGE``: rebuild bitmaps missing from overlays made after a checkpoint,
from the same evidence the daemon judges with.

A rebuilt copy is complete only if the bitmap's lowest copy is where its checkpoint was taken
and nothing since was lost.  So the command asks libvirt which domain's disk IMAGE is, reads
that domain's checkpoints and the daemon's records of the disk (what it distrusts, where
committed layers' bits went, where checkpoints were taken), and refuses what those do not
prove.  An image no domain uses has none of that: it is refused, unless the person running the
command vouches for the images (``--without-libvirt``).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from typing import Any

import libvirt

from .. import images, printing
from ..births import births_now
from ..config import DEFAULT_PATH, load
from ..errors import LibvirtFailed, RepairRefused
from ..filling import fills_now
from ..heal import HealResult, heal_chain
from ..look.judge import Evidence, distrust
from ..readers.checkpoints import domain_checkpoints
from ..readers.image_owner import disk_topped_by
from ..state import DomainState, StateStore
from . import EXIT_FAILED, EXIT_OK
from .roots import storage_roots_of


def main(args: argparse.Namespace) -> int:
    roots = storage_roots_of(args)
    evidence = {} if args.without_libvirt else _evidence(args.image, args.config)
    done = heal_chain(args.image, storage_roots=roots, dry_run=args.dry_run, **evidence)
    if args.json:
        print(json.dumps({"result": done.result.value, **printing.heal_json(done.plan)}, indent=2))
    else:
        print(printing.heal_text(done.chain.top.path, done.plan))
        print(f"result: {done.result.value}")
        if done.result is HealResult.PLANNED:
            print("dry run: nothing was changed")
    return EXIT_FAILED if done.plan.refused else EXIT_OK


def _evidence(image: str, config: str | None) -> dict[str, Any]:
    """What the daemon would judge the disk of ``image`` with, as ``heal_chain`` takes it."""
    settings = load(config or DEFAULT_PATH)
    try:
        conn = libvirt.openReadOnly(settings.uri)
    except libvirt.libvirtError as error:
        raise LibvirtFailed(
            f"{settings.uri}: cannot ask which domain uses {image}: {error}"
        ) from error
    try:
        found = disk_topped_by(conn, image)
        if found is None:
            raise RepairRefused(
                image,
                f"it is the disk of no domain on {settings.uri}: nothing shows where its "
                "checkpoints were taken (--without-libvirt relies on each bitmap's lowest copy)",
            )
        domain, disk = found
        checkpoints = domain_checkpoints(domain)
        record = StateStore(settings.state_dir, read_only=True).load(domain.UUIDString())
    finally:
        conn.close()
    target = disk.target
    remembered = DomainState(uuid="", name="") if record is None else record
    evidence = Evidence(
        target=target,
        checkpoints=checkpoints,
        merged_into=remembered.merged_into.get(target, {}),
        births=births_now(checkpoints, target, remembered.births.get(target, {})),
    )
    chain = images.read_chain(image, formats=disk.formats, force_share=True)
    evidence = replace(
        evidence,
        filled=fills_now(remembered.filled.get(target, {}), chain.images, checkpoints, target),
    )
    untrusted = distrust(
        chain.images,
        evidence,
        remembered=remembered.untrusted.get(target, {}),
        after_commits={},
    )
    return {
        "formats": disk.formats,
        "checkpoints": checkpoints,
        "target": target,
        "untrusted": set(untrusted),
        "merged_into": dict(evidence.merged_into),
        "births": evidence.births,
        "filled": evidence.filled,
    }
