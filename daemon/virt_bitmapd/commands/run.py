"""``virt-bitmapd run``: the daemon, with the config file's settings and the flags over them."""

from __future__ import annotations

import argparse
import asyncio

from ..config import FLAGS, VALIDATORS, Settings, load
from ..observability.logs import configure as configure_logging
from ..service.daemon import Daemon
from ..service.heap import limit_arenas


def settings_of(args: argparse.Namespace) -> Settings:
    """The config file, then every flag given (each setting's flag is named after it, or as
    ``config.FLAGS`` says)."""
    overrides = {}
    for name in VALIDATORS:
        value = getattr(args, FLAGS.get(name, name).replace("-", "_"))
        overrides[name] = tuple(value) if isinstance(value, list) else value
    return load(args.config, overrides)


def main(args: argparse.Namespace) -> int:
    settings = settings_of(args)
    configure_logging(settings.log_format, settings.log_level)
    limit_arenas()
    return asyncio.run(Daemon(settings).run())
