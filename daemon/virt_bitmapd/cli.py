"""Command line: ``virt-bitmapd run | status | check | inspect | reconcile | heal |
check-config``.

This module only parses.  Each command lives in ``commands/`` and is imported when it runs, so
a one-shot command loads nothing of the service (``virt-bitmapd reconcile``, which a cold-merge
tool runs once per merge, starts without asyncio's machinery, libvirt's event thread or
prometheus_client).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from . import __version__
from .commands import EXIT_FAILED, EXIT_UNKNOWN, EXIT_USAGE
from .config import DEFAULT_PATH, ConfigError
from .errors import VirtBitmapdError

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    """Exits ``usage_status`` on a mistake in the arguments (``check``'s 2 means something else:
    a monitoring plugin's usage error is 3, unknown)."""

    usage_status = EXIT_USAGE

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(self.usage_status, f"{self.prog}: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="virt-bitmapd",
        description="Keep qcow2 checkpoint dirty bitmaps whole across block commits.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_Parser
    )

    inspect = commands.add_parser(
        "inspect",
        help="show an image's backing chain, its bitmaps and whether each bitmap chain is valid",
        description="Show IMAGE's backing chain, every bitmap with its granularity and flags, "
        "and whether each bitmap's chain is valid from the top (libvirt's rule). Works on "
        "images open in a running VM too (their in-use flags are then stale). IMAGE is opened "
        "as qcow2, never probed; each layer below as the format its overlay records, and a "
        "backing file whose format is not recorded, or that is not a plain file, is refused.",
    )
    inspect.add_argument("image", metavar="IMAGE")
    inspect.add_argument("--json", action="store_true", help="print JSON")

    reconcile = commands.add_parser(
        "reconcile",
        help="after 'qemu-img commit', carry TOP's checkpoint bitmaps into BASE (images at rest)",
        description="For images no process holds open, after a commit done outside libvirt "
        "(TOP still exists and still backs onto BASE, as after 'qemu-img commit -d'): add to "
        "BASE every valid checkpoint bitmap of TOP and merge in the bits of the committed "
        "layers, in one atomic transaction. TOP is opened as qcow2 and every layer below as "
        "the format its overlay records (never probed). Exit 0 when BASE ends reconciled "
        "(nothing to do included), 1 with a one-line reason otherwise.",
    )
    reconcile.add_argument("--top", required=True, help="the commit top (an image path)")
    reconcile.add_argument("--base", required=True, help="the commit base, below TOP")
    reconcile.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    reconcile.add_argument("--json", action="store_true", help="print the plan and outcome as JSON")
    _add_root_arguments(reconcile, "BASE lies")
    heal = commands.add_parser(
        "heal",
        help="rebuild checkpoint bitmaps missing from overlays made after the checkpoint "
        "(images at rest)",
        description="For images no process holds open: a bitmap whose chain libvirt finds "
        "broken only because layers above its lowest copy lack it (overlays made by a tool "
        "that copies no bitmaps) is rebuilt in each such layer from that layer's allocated "
        "clusters, a superset of what was written there since the checkpoint: a backup may "
        "hold a few blocks more, never fewer. Refused, with the reason, when that does not "
        "hold (the lowest copy disabled or inconsistent, a copy above it unusable, the "
        "bitmap untrusted, libvirt's checkpoint taken on another layer or a layer gone since). "
        "IMAGE must be the disk of a libvirt domain (the config file's URI): its checkpoints "
        "and the daemon's records prove what is rebuilt; --without-libvirt for an image no "
        "domain uses. One transaction per image. IMAGE is opened as qcow2, layers below as "
        "their overlays record. Exit 0 when nothing was refused, 1 otherwise.",
    )
    heal.add_argument("image", metavar="IMAGE")
    heal.add_argument(
        "--without-libvirt",
        action="store_true",
        help="IMAGE is the disk of no libvirt domain: rely on each bitmap's lowest copy being "
        "where its checkpoint was taken (without it, the domain's checkpoints and the "
        "daemon's records must prove what is rebuilt)",
    )
    heal.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    heal.add_argument("--json", action="store_true", help="print the plan and result as JSON")
    _add_root_arguments(heal, "every image to change lies")

    run = commands.add_parser(
        "run",
        help="run the daemon: watch libvirt, keep checkpoint bitmaps whole across commits",
        description="Watch libvirt's block job and lifecycle events and rescan chains, so that "
        "every commit (by libvirt, or by qemu-img outside it) leaves its base with every valid "
        "checkpoint bitmap. Settings come from the config file; flags override it.",
    )
    run.add_argument("--config", default=DEFAULT_PATH, help=f"config file (default {DEFAULT_PATH})")
    run.add_argument("--uri", help="libvirt URI (default qemu:///system)")
    run.add_argument(
        "--state-dir", help="where known chains are kept (default /var/lib/virt-bitmapd)"
    )
    run.add_argument(
        "--storage-root",
        action="append",
        metavar="DIR",
        help="the only places whose images may be changed; repeatable "
        "(default /var/lib/libvirt/images)",
    )
    run.add_argument(
        "--rescan-interval", type=float, metavar="SECONDS", help="full rescan period (default 300)"
    )
    run.add_argument(
        "--snapshot-watch-interval",
        type=float,
        metavar="SECONDS",
        help="how often running domains' XML is compared with their known chains, the safety "
        "net for snapshots in unwatched directories (default 120; 0: off)",
    )
    run.add_argument(
        "--no-watch",
        dest="watch",
        action="store_false",
        default=None,
        help="do not watch the layers' directories with inotify; find snapshots with the "
        "safety net (--snapshot-watch-interval) only",
    )
    run.add_argument("--concurrency", type=int, help="disks handled at once (default 4)")
    run.add_argument(
        "--control-socket",
        metavar="PATH",
        help="where 'virt-bitmapd check' asks for a look (default /run/virt-bitmapd/control.sock; "
        "empty string: off)",
    )
    run.add_argument(
        "--metrics-listen",
        metavar="HOST:PORT",
        help="Prometheus endpoint (default 127.0.0.1:9411; empty string: off)",
    )
    run.add_argument(
        "--log-format", help="auto (journald under systemd, else json), journal, json, console"
    )
    run.add_argument("--log-level", help="debug, info, warning, error (default info)")
    run.add_argument(
        "--untrusted",
        choices=("fill", "disable", "report"),
        help="a bitmap whose bits cannot be proven complete gets every bit set, so every "
        "reader's next incremental backup copies the whole disk (default; disabled where that "
        "fails), is disabled, so libvirt refuses incremental backups from its checkpoint, or is "
        "only reported",
    )
    run.add_argument(
        "--heal",
        action="store_true",
        default=None,
        help="heal broken checkpoints of shut-off domains that 'virt-bitmapd heal' can rebuild "
        "(default off)",
    )

    status = commands.add_parser(
        "status",
        help="show every checkpoint's state and what an incremental backup from it would do",
        description="For each domain (or DOMAIN), disk and checkpoint: its state (usable; "
        "broken: libvirt refuses a backup from it; untrusted: virt-bitmapd cannot prove its "
        "bits complete; missing: no bitmap; orphan_bitmap: a bitmap no checkpoint names; busy: "
        "a block job runs on the disk), "
        "the reason, and what the next incremental backup from it does: safe, refused by "
        "libvirt, or would miss data. Reads libvirt, the images and the daemon's state "
        "directory; never writes; works with or without the daemon. Exit 0 when every disk "
        "could be judged, 1 otherwise.",
    )
    status.add_argument("domain", nargs="?", metavar="DOMAIN")
    status.add_argument("--json", action="store_true", help="print JSON")
    status.add_argument("--uri", help="libvirt URI (default: the config file's, qemu:///system)")
    status.add_argument(
        "--config",
        help=f"config file whose URI and state directory apply (default {DEFAULT_PATH})",
    )

    _add_check(commands)

    check = commands.add_parser(
        "check-config",
        help="validate a config file without starting",
        description="Validate the config file; print each problem as FILE:KEY: reason.",
    )
    check.add_argument("path", nargs="?", default=DEFAULT_PATH, metavar="PATH")
    return parser


def _add_check(commands: Any) -> None:
    gate = commands.add_parser(
        "check",
        help="before a backup: is an incremental backup from the checkpoint complete? "
        "(exit 0 yes, 1 take a full, 2 it would miss data, 3 unknown)",
        description="Judge one checkpoint of DOMAIN (the latest by default) on every disk it "
        "covers, for libvirt's backup API and for an offline export of its bitmap "
        "(qemu-nbd --bitmap, as virtnbdbackup runs it for a shut-off domain). The running "
        "daemon is asked to look at the domain first, and the answer comes from what that "
        "look left; without a daemon, it judges read-only and says so. Exit status, as "
        "monitoring plugins have it: 0 an incremental backup is complete for both readers; "
        "1 take a full backup (a reader refuses it: broken, quarantined, missing, no "
        "checkpoint); 2 an incremental would miss data (untrusted under a report-only "
        "policy); 3 unknown (a block job runs, a disk or the daemon's memory cannot be read, "
        "the daemon's look did not end in time).",
    )
    gate.usage_status = EXIT_UNKNOWN
    gate.add_argument("domain", metavar="DOMAIN")
    chosen = gate.add_mutually_exclusive_group()
    chosen.add_argument("--checkpoint", metavar="NAME", help="the checkpoint to judge")
    chosen.add_argument(
        "--latest", action="store_true", help="the last created checkpoint (the default)"
    )
    gate.add_argument("--disk", metavar="TARGET", help="judge this disk only (e.g. vda)")
    gate.add_argument("--json", action="store_true", help="print JSON")
    gate.add_argument(
        "--wait",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="wait up to SECONDS for a block job on the domain's disks to end and for the "
        "daemon's look (without it: a running job answers 3 at once, and the look is given "
        "30 s)",
    )
    gate.add_argument("--uri", help="libvirt URI (default: the config file's, qemu:///system)")
    gate.add_argument(
        "--config",
        help="config file whose URI, state directory and control socket apply "
        f"(default {DEFAULT_PATH})",
    )


def _add_root_arguments(command: argparse.ArgumentParser, what: str) -> None:
    """--storage-root and --config of a command that changes images a person names."""
    command.add_argument(
        "--storage-root",
        action="append",
        metavar="DIR",
        help=f"refuse unless {what} under DIR (repeatable); without it, the storage roots "
        "of the config file, when there is one",
    )
    command.add_argument(
        "--config",
        help=f"config file whose storage roots apply (default {DEFAULT_PATH} when it exists; "
        "with neither this nor --storage-root, any path you name)",
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    command = importlib.import_module(f".commands.{args.command.replace('-', '_')}", __package__)
    try:
        result: int = command.main(args)
        return result
    except ConfigError as error:
        for problem in error.problems:
            print(problem, file=sys.stderr)
        return EXIT_USAGE
    except VirtBitmapdError as error:
        if getattr(args, "json", False):
            from .printing import error_json

            print(json.dumps({"result": "failed", "error": error_json(error)}, indent=2))
        print(f"virt-bitmapd {args.command}: {error}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
