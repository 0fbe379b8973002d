"""Command line: ``virt-bitmapd inspect`` and ``virt-bitmapd reconcile``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from . import __version__, images, report
from .errors import ImageInUse, VirtBitmapdError
from .model import Result
from .reconcile import reconcile_at_rest

__all__ = ["main"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="virt-bitmapd",
        description="Keep qcow2 checkpoint dirty bitmaps whole across block commits.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    inspect = commands.add_parser(
        "inspect",
        help="show an image's backing chain, its bitmaps and whether each bitmap chain is valid",
        description="Show IMAGE's backing chain, every bitmap with its granularity and flags, "
        "and whether each bitmap's chain is valid from the top (libvirt's rule). Works on "
        "images open in a running VM too (their in-use flags are then stale).",
    )
    inspect.add_argument("image", metavar="IMAGE")
    inspect.add_argument("--json", action="store_true", help="print JSON")

    reconcile = commands.add_parser(
        "reconcile",
        help="after 'qemu-img commit', carry TOP's checkpoint bitmaps into BASE (images at rest)",
        description="For images no process holds open, after a commit done outside libvirt "
        "(TOP still exists and still backs onto BASE, as after 'qemu-img commit -d'): add to "
        "BASE every valid checkpoint bitmap of TOP and merge in the bits of the committed "
        "layers, in one atomic transaction. Exit 0 when BASE ends reconciled (nothing to do "
        "included), 1 with a one-line reason otherwise.",
    )
    reconcile.add_argument("--top", required=True, help="the commit top (an image path)")
    reconcile.add_argument("--base", required=True, help="the commit base, below TOP")
    reconcile.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    reconcile.add_argument("--json", action="store_true", help="print the plan and outcome as JSON")
    reconcile.add_argument(
        "--storage-root",
        action="append",
        metavar="DIR",
        help="refuse unless BASE lies under DIR (repeatable); without it, any path you name",
    )
    return parser


def _inspect(args: argparse.Namespace) -> int:
    open_elsewhere = False
    try:
        chain = images.read_chain(args.image)
    except ImageInUse:
        chain = images.read_chain(args.image, force_share=True)
        open_elsewhere = True
    if args.json:
        print(json.dumps(report.chain_json(chain, open_elsewhere=open_elsewhere), indent=2))
    else:
        print(report.chain_text(chain, open_elsewhere=open_elsewhere))
    return EXIT_OK


def _reconcile(args: argparse.Namespace) -> int:
    outcome = reconcile_at_rest(
        args.top, args.base, storage_roots=args.storage_root, dry_run=args.dry_run
    )
    if args.json:
        document = {
            "result": outcome.result.value,
            "plan": report.plan_json(outcome.plan, outcome.outcome),
        }
        print(json.dumps(document, indent=2))
    else:
        print(report.plan_text(outcome.plan, outcome.outcome))
        print(f"result: {outcome.result.value}")
        if outcome.result is Result.PLANNED:
            print("dry run: nothing was changed")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handler = {"inspect": _inspect, "reconcile": _reconcile}[args.command]
    try:
        return handler(args)
    except VirtBitmapdError as error:
        if getattr(args, "json", False):
            print(json.dumps({"result": "failed", "error": report.error_json(error)}, indent=2))
        print(f"virt-bitmapd {args.command}: {error}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
