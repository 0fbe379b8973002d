"""``virt-bitmapd status``: every checkpoint judged, read-only."""

from __future__ import annotations

import argparse
import json

from .. import printing
from ..config import DEFAULT_PATH, load
from ..status import host_status
from . import EXIT_FAILED, EXIT_OK


def main(args: argparse.Namespace) -> int:
    settings = load(args.config or DEFAULT_PATH, {"uri": args.uri})
    found = host_status(settings.uri, settings.state_dir, args.domain)
    if args.json:
        print(json.dumps(printing.status_json(found), indent=2))
    else:
        print(printing.status_text(found))
    return EXIT_OK if found.complete else EXIT_FAILED
