"""glibc heap housekeeping, so the daemon's resident memory follows what it holds.

* glibc gives each thread that allocates its own malloc arena, up to 8 per core; the daemon's
  worker threads (libvirt calls, QEMU tools) would each keep one partly used. Two are enough.
* A full rescan (a startup on a host of hundreds of domains) parses much and keeps little; the
  freed memory stays in the heap until ``malloc_trim`` gives it back.

Both are no-ops where the C library has no such calls.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc

__all__ = ["give_back_memory", "limit_arenas"]

M_ARENA_MAX = -8  # mallopt's parameter number in glibc


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None)


def limit_arenas(arenas: int = 2) -> None:
    """Before any thread starts."""
    with contextlib.suppress(OSError, AttributeError):
        _libc().mallopt(M_ARENA_MAX, arenas)


def give_back_memory() -> None:
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        _libc().malloc_trim(0)
