"""``virt-bitmapd check-config``: validate a config file and show what it sets."""

from __future__ import annotations

import argparse

from ..config import VALIDATORS, load
from . import EXIT_OK


def main(args: argparse.Namespace) -> int:
    settings = load(args.path)
    print(f"{args.path}: ok")
    for name in VALIDATORS:
        print(f"  {name} = {getattr(settings, name)!r}")
    return EXIT_OK
