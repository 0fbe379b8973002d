"""Command line: ``virt-bitmapd run | status | inspect | reconcile | heal | check-config``.

What only the one-shot commands print with (``report``, ``status``) is imported by them, when
they run: the service carries none of it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Sequence

from . import __version__, images
from .config import DEFAULT_PATH, ConfigError, Settings, load
from .errors import ImageInUse, VirtBitmapdError
from .handover import Handover
from .heal import HealResult, heal_chain
from .model import Result
from .observability.logs import configure as configure_logging
from .reconcile import reconcile_at_rest
from .service.daemon import Daemon
from .service.heap import limit_arenas
from .storage_roots import root_problem

__all__ = ["main"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
# how long `reconcile` waits for an image another process holds, and how often it tries
LOCK_WAIT = 10.0
LOCK_RETRY = 0.5


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
        "hold (the lowest copy disabled or inconsistent, a copy above it unusable). One "
        "transaction per image. IMAGE is opened as qcow2, layers below as their overlays "
        "record. Exit 0 when nothing was refused, 1 otherwise.",
    )
    heal.add_argument("image", metavar="IMAGE")
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
        choices=("disable", "report"),
        help="a bitmap whose bits cannot be proven complete is disabled, so libvirt refuses "
        "incremental backups from its checkpoint (default), or only reported",
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
        "bits complete; missing: no bitmap; orphan_bitmap: a bitmap no checkpoint names), "
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

    check = commands.add_parser(
        "check-config",
        help="validate a config file without starting",
        description="Validate the config file; print each problem as FILE:KEY: reason.",
    )
    check.add_argument("path", nargs="?", default=DEFAULT_PATH, metavar="PATH")
    return parser


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


def _settings(args: argparse.Namespace) -> Settings:
    return load(
        args.config,
        {
            "uri": args.uri,
            "state_dir": args.state_dir,
            "storage_roots": tuple(args.storage_root) if args.storage_root else None,
            "rescan_interval": args.rescan_interval,
            "snapshot_watch_interval": args.snapshot_watch_interval,
            "watch": args.watch,
            "concurrency": args.concurrency,
            "metrics_listen": args.metrics_listen,
            "log_format": args.log_format,
            "log_level": args.log_level,
            "untrusted_policy": args.untrusted,
            "heal": args.heal,
        },
    )


def _run(args: argparse.Namespace) -> int:
    settings = _settings(args)
    configure_logging(settings.log_format, settings.log_level)
    limit_arenas()
    return asyncio.run(Daemon(settings).run())


def _check_config(args: argparse.Namespace) -> int:
    settings = load(args.path)
    print(f"{args.path}: ok")
    for name in (
        "uri",
        "storage_roots",
        "state_dir",
        "rescan_interval",
        "snapshot_watch_interval",
        "watch",
        "concurrency",
        "metrics_listen",
        "log_format",
        "log_level",
        "untrusted_policy",
        "heal",
    ):
        print(f"  {name} = {getattr(settings, name)!r}")
    return EXIT_OK


def _inspect(args: argparse.Namespace) -> int:
    from . import report

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


def _status(args: argparse.Namespace) -> int:
    from . import report
    from .status import host_status

    settings = load(args.config or DEFAULT_PATH, {"uri": args.uri})
    found = host_status(settings.uri, settings.state_dir, args.domain)
    if args.json:
        print(json.dumps(report.status_json(found), indent=2))
    else:
        print(report.status_text(found))
    return EXIT_OK if found.complete else EXIT_FAILED


def _reconcile_roots(args: argparse.Namespace) -> tuple[str, ...] | None:
    """The flags' roots; else the config file's (the host's rule applies to people too); else
    none, for images a person names on a machine where nothing is configured."""
    if args.storage_root:
        problems = [
            f"--storage-root: {problem}"
            for problem in map(root_problem, args.storage_root)
            if problem is not None
        ]
        if problems:
            raise ConfigError(problems)
        return tuple(args.storage_root)
    settings = load(args.config or DEFAULT_PATH)
    return settings.storage_roots if settings.source != "defaults" else None


def _reconcile(args: argparse.Namespace) -> int:
    from . import report

    roots = _reconcile_roots(args)
    deadline = time.monotonic() + LOCK_WAIT
    while True:
        try:
            outcome = reconcile_at_rest(
                args.top, args.base, storage_roots=roots, dry_run=args.dry_run
            )
            break
        except ImageInUse:
            # the daemon's watch may have seen the commit too and be reconciling it this moment
            if time.monotonic() >= deadline:
                raise
            time.sleep(LOCK_RETRY)
    if outcome.result is not Result.PLANNED:
        _tell_the_daemon(args, outcome.plan.base, outcome.committed)
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


def _heal(args: argparse.Namespace) -> int:
    from . import report

    done = heal_chain(args.image, storage_roots=_reconcile_roots(args), dry_run=args.dry_run)
    if args.json:
        print(json.dumps({"result": done.result.value, **report.heal_json(done.plan)}, indent=2))
    else:
        print(report.heal_text(done.chain.top.path, done.plan))
        print(f"result: {done.result.value}")
        if done.result is HealResult.PLANNED:
            print("dry run: nothing was changed")
    return EXIT_FAILED if done.plan.refused else EXIT_OK


def _tell_the_daemon(args: argparse.Namespace, base: str, committed: tuple[str, ...]) -> None:
    """Leave a record for the daemon, so that deleting the committed layers now is not taken
    for a loss (see handover)."""
    state_dir = load(args.config or DEFAULT_PATH).state_dir
    try:
        Handover(state_dir).record(base, committed)
    except OSError as error:
        print(
            f"virt-bitmapd reconcile: note: {state_dir}: the daemon could not be told "
            f"({error.strerror}); it will report these layers' bits as unprovable once they "
            "are deleted",
            file=sys.stderr,
        )


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handler = {
        "inspect": _inspect,
        "reconcile": _reconcile,
        "heal": _heal,
        "run": _run,
        "check-config": _check_config,
        "status": _status,
    }[args.command]
    try:
        return handler(args)
    except ConfigError as error:
        for problem in error.problems:
            print(problem, file=sys.stderr)
        return EXIT_USAGE
    except VirtBitmapdError as error:
        if getattr(args, "json", False):
            from . import report

            print(json.dumps({"result": "failed", "error": report.error_json(error)}, indent=2))
        print(f"virt-bitmapd {args.command}: {error}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
