"""``virt-bitmapd heal IMAGE``: rebuild bitmaps missing from overlays made after a checkpoint."""

from __future__ import annotations

import argparse
import json

from .. import printing
from ..heal import HealResult, heal_chain
from . import EXIT_FAILED, EXIT_OK
from .roots import storage_roots_of


def main(args: argparse.Namespace) -> int:
    done = heal_chain(args.image, storage_roots=storage_roots_of(args), dry_run=args.dry_run)
    if args.json:
        print(json.dumps({"result": done.result.value, **printing.heal_json(done.plan)}, indent=2))
    else:
        print(printing.heal_text(done.chain.top.path, done.plan))
        print(f"result: {done.result.value}")
        if done.result is HealResult.PLANNED:
            print("dry run: nothing was changed")
    return EXIT_FAILED if done.plan.refused else EXIT_OK
