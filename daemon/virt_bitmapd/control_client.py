"""Ask the running daemon to look at a domain now, through its control socket
(``service.control``).  A one-shot command imports this alone, not the service."""

from __future__ import annotations

import json
import socket

__all__ = ["MAX_TIMEOUT", "REQUEST_LIMIT", "LookFailed", "ask_for_look"]

REQUEST_LIMIT = 4096  # bytes: a domain name and a number
MAX_TIMEOUT = 3600.0


class LookFailed(Exception):
    """The look cannot be done or did not end in time; the message says why."""


def ask_for_look(path: str, domain: str, timeout: float) -> list[str]:
    """Ask the daemon listening on ``path`` to look at ``domain`` now; the disks it looked at.
    Raises OSError when no daemon answers there, LookFailed when it could not look."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout + 5)
        sock.connect(path)
        sock.sendall(json.dumps({"look": domain, "timeout": timeout}).encode() + b"\n")
        with sock.makefile("rb") as stream:
            line = stream.readline(REQUEST_LIMIT * 16)
    try:
        answer = json.loads(line)
    except ValueError as error:
        raise LookFailed(f"{path}: the daemon's answer is not JSON: {line[:200]!r}") from error
    if "error" in answer:
        raise LookFailed(str(answer["error"]))
    return [str(target) for target in answer.get("looked", [])]
