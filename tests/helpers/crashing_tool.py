#!/usr/bin/env python3
"""Stands in for a QEMU tool and kills it at a chosen QMP command, as a crash would.

Put on PATH under the tool's name.  Environment: VBD_REAL_TOOL (the real binary), VBD_CRASH_AT
(``before:CMD`` kills the tool when CMD arrives, before passing it on; ``after:CMD`` passes it
on, then kills; ``hold:CMD`` keeps CMD back and waits forever, the tool holding what it opened,
as a daemon killed at that moment would leave it, and creates the file VBD_HOLDING_MARK names
once every command before CMD was answered; ``refuse:CMD`` answers CMD with a QMP error in
QEMU's place and passes everything else on, nothing crashing), VBD_CRASH_SIGNAL (ABRT, KILL,
...).  The tool's output goes straight to ours; when it is dead, this process dies by the same
signal, so the caller sees what a crash shows.  The real tool dies with this stand-in, as it
would with its caller.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path


def main() -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core files from the aborts
    when, _, command = os.environ["VBD_CRASH_AT"].partition(":")
    crash = getattr(signal, "SIG" + os.environ.get("VBD_CRASH_SIGNAL", "ABRT"))
    real = [os.environ["VBD_REAL_TOOL"], *sys.argv[1:]]
    tool = subprocess.Popen(["setpriv", "--pdeathsig", "KILL", "--", *real], stdin=subprocess.PIPE)
    assert tool.stdin is not None
    for line in sys.stdin.buffer:
        hit = f'"execute": "{command}"'.encode() in line
        if hit and when == "hold":
            Path(os.environ["VBD_HOLDING_MARK"]).touch()
            while True:
                time.sleep(3600)
        if hit and when == "refuse":
            refusal = {"error": {"class": "GenericError", "desc": f"{command} refused (test)"}}
            sys.stdout.write(json.dumps(refusal) + "\n")
            sys.stdout.flush()
            continue
        if hit and when == "before":
            break
        tool.stdin.write(line)
        tool.stdin.flush()
        if hit:
            time.sleep(0.01)  # let it start on the command
            break
    else:
        tool.stdin.close()
        sys.exit(tool.wait())
    tool.send_signal(crash)
    tool.wait()
    if crash != signal.SIGKILL:
        signal.signal(crash, signal.SIG_DFL)
    os.kill(os.getpid(), crash)


if __name__ == "__main__":
    main()
