"""A minimal synchronous QMP client over a child process's stdin/stdout.

QMP is one JSON object per line.  Asynchronous events can arrive between a command and its
answer; they are kept aside, not mistaken for the answer.  Every read has a deadline, so a stuck
child cannot hang the caller.
"""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import time
from typing import IO, Any

from ..errors import QMPError, ToolCrashed, ToolFailed
from ..qemu_messages import describe_exit
from ..qmp import JSON

__all__ = ["QMPStream"]


class QMPStream:
    """Talks QMP to ``process`` (started with stdin and stdout as pipes)."""

    def __init__(self, process: subprocess.Popen[bytes], *, tool: str, timeout: float) -> None:
        if process.stdin is None or process.stdout is None:
            raise ValueError("the QMP process needs piped stdin and stdout")
        self._process = process
        self._stdin: IO[bytes] = process.stdin
        self._stdout_fd = process.stdout.fileno()
        self._tool = tool
        self._timeout = timeout
        self._buffer = b""

    def handshake(self) -> None:
        greeting = self._read_message()
        if "QMP" not in greeting:
            raise ToolFailed(f"{self._tool}: expected a QMP greeting, got {greeting!r}")
        self.execute({"execute": "qmp_capabilities"})

    def execute(self, command: JSON) -> Any:
        """Send one command and return its ``return`` value; raise QMPError on an error."""
        name = str(command.get("execute"))
        try:
            self._stdin.write(json.dumps(command).encode() + b"\n")
            self._stdin.flush()
        except (BrokenPipeError, OSError) as error:
            raise ToolFailed(f"{self._tool} went away before {name}: {error}") from error
        while True:
            message = self._read_message()
            if "event" in message:  # asynchronous news, not the answer
                continue
            if "error" in message:
                failure = message["error"]
                raise QMPError(name, str(failure.get("desc")))
            if "return" in message:
                return message["return"]
            raise ToolFailed(f"{self._tool}: unexpected answer to {name}: {message!r}")

    def _read_message(self) -> JSON:
        deadline = time.monotonic() + self._timeout
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ToolFailed(f"{self._tool} did not answer within {self._timeout:.0f} s")
            with selectors.DefaultSelector() as selector:
                selector.register(self._stdout_fd, selectors.EVENT_READ)
                if not selector.select(remaining):
                    continue
            chunk = os.read(self._stdout_fd, 65536)
            if not chunk:
                code = self._exit_code()
                ended = f"{self._tool} {describe_exit(code)} unexpectedly"
                if code is not None and code < 0:
                    raise ToolCrashed(ended)
                raise ToolFailed(ended)
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        try:
            message = json.loads(line)
        except json.JSONDecodeError as error:
            raise ToolFailed(f"{self._tool} printed something that is not QMP: {line!r}") from error
        if not isinstance(message, dict):
            raise ToolFailed(f"{self._tool} printed something that is not QMP: {line!r}")
        return message

    def _exit_code(self) -> int | None:
        try:
            return self._process.wait(timeout=1)
        except subprocess.TimeoutExpired:
            return None
