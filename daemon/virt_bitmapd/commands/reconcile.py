"""``virt-bitmapd reconcile --top TOP --base BASE``: after ``qemu-img commit``, carry TOP's
checkpoint bitmaps into BASE, and leave the daemon a record of it."""

from __future__ import annotations

import argparse
import json
import sys
import time

from .. import printing
from ..config import DEFAULT_PATH, load
from ..errors import ImageInUse
from ..handover import Handover
from ..model import Result
from ..reconcile import reconcile_at_rest
from . import EXIT_OK
from .roots import storage_roots_of

# how long it waits for an image another process holds, and how often it tries
LOCK_WAIT = 10.0
LOCK_RETRY = 0.5


def main(args: argparse.Namespace) -> int:
    roots = storage_roots_of(args)
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
            "plan": printing.plan_json(outcome.plan, outcome.outcome),
        }
        print(json.dumps(document, indent=2))
    else:
        print(printing.plan_text(outcome.plan, outcome.outcome))
        print(f"result: {outcome.result.value}")
        if outcome.result is Result.PLANNED:
            print("dry run: nothing was changed")
    return EXIT_OK


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
