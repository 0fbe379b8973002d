"""The storage roots a command that changes images a person names must keep to."""

from __future__ import annotations

import argparse

from ..config import DEFAULT_PATH, ConfigError, load
from ..storage_roots import root_problem


def storage_roots_of(args: argparse.Namespace) -> tuple[str, ...] | None:
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
