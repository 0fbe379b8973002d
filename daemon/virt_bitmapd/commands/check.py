"""``virt-bitmapd check DOMAIN``: the pre-backup gate (see ``gate``), its exit status the
monitoring plugins' (0 incremental, 1 full, 2 would miss data, 3 unknown).

The running daemon is asked to look at the domain first (its control socket), so a backup that
starts a second after a commit, a shutdown or a cold merge is judged on what that look left;
the judgement itself is ``status``'s, read-only.  Any failure to judge is 3, never 1 or 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from ..config import DEFAULT_PATH, ConfigError, Settings, load
from ..control_client import MAX_TIMEOUT, LookFailed, ask_for_look
from ..errors import VirtBitmapdError
from ..gate import GateAnswer, Verdict, gate
from ..health import State
from ..status import host_status

#: how long the daemon's look may take when --wait is not given
LOOK_TIMEOUT = 30.0
#: how often a block job is asked after, under --wait
JOB_POLL = 1.0


def main(args: argparse.Namespace) -> int:
    try:
        settings = load(args.config or DEFAULT_PATH, {"uri": args.uri})
    except ConfigError as error:
        return _unknown(args, f"the config file: {'; '.join(error.problems)}")
    if not 0 <= args.wait <= MAX_TIMEOUT:
        return _unknown(args, f"--wait {args.wait:g}: not between 0 and {MAX_TIMEOUT:g} seconds")
    deadline = time.monotonic() + args.wait
    while True:
        try:
            looked = _ask_the_daemon(settings, args.domain, args.wait or LOOK_TIMEOUT)
        except DaemonFailed as error:
            return _unknown(args, str(error))
        try:
            host = host_status(settings.uri, settings.state_dir, args.domain)
        except VirtBitmapdError as error:
            return _unknown(args, str(error), looked)
        (domain,) = host.domains
        answer = gate(domain, args.checkpoint, disk=args.disk, memory_error=host.memory_error)
        busy = any(disk.state == State.BUSY.value for disk in answer.disks)
        remaining = deadline - time.monotonic()
        if not busy or remaining <= 0:
            break
        time.sleep(min(JOB_POLL, remaining))  # then a look after the job's end is asked for
    _print(args, answer, looked)
    return int(answer.verdict)


class DaemonFailed(Exception):
    """A daemon is there but did not look: its answer cannot be trusted to be fresh."""


def _ask_the_daemon(settings: Settings, domain: str, timeout: float) -> str:
    """Have the daemon look at ``domain`` now; what the answer rests on, for people.  Raises
    DaemonFailed when a daemon answers but could not look, or does not answer in time."""
    if not settings.control_socket:
        return "judged read-only: the daemon's control socket is off (daemon.control_socket)"
    try:
        ask_for_look(settings.control_socket, domain, timeout)
    except LookFailed as error:
        raise DaemonFailed(f"the daemon could not look: {error}") from error
    except TimeoutError as error:
        raise DaemonFailed(f"the daemon did not answer within {timeout:g} s") from error
    except OSError as error:
        why = error.strerror or str(error)
        return f"judged read-only: no daemon answered at {settings.control_socket} ({why})"
    return "the daemon looked just now"


def _unknown(args: argparse.Namespace, why: str, looked: str = "") -> int:
    answer = GateAnswer(
        domain=args.domain, checkpoint=args.checkpoint, verdict=Verdict.UNKNOWN, reason=why
    )
    _print(args, answer, looked)
    return int(Verdict.UNKNOWN)


def _print(args: argparse.Namespace, answer: GateAnswer, looked: str) -> None:
    if args.json:
        print(json.dumps(answer_json(answer, looked), indent=2))
        return
    subject = answer.domain + (f" checkpoint {answer.checkpoint}" if answer.checkpoint else "")
    print(
        f"{answer.verdict.label}: {subject}: {answer.verdict.advice}"
        + (f": {answer.reason}" if answer.verdict is not Verdict.INCREMENTAL else "")
    )
    for disk in answer.disks:
        print(f"  {disk.name}: {disk.state or disk.verdict.name.lower()}: {disk.reason}")
    if looked:
        print(f"  ({looked})")
    sys.stdout.flush()


def answer_json(answer: GateAnswer, looked: str) -> dict[str, object]:
    """libvirt's names for the domain, the checkpoint and its disks (``name``, ``bitmap``)."""
    return {
        "domain": answer.domain,
        "checkpoint": answer.checkpoint,
        "exit": int(answer.verdict),
        "status": answer.verdict.label,
        "verdict": answer.verdict.name.lower(),
        "reason": answer.reason,
        "looked": looked,
        "disks": [
            {
                "name": disk.name,
                "bitmap": disk.bitmap,
                "verdict": disk.verdict.name.lower(),
                "state": disk.state,
                "backup": disk.backup,
                "offline_export": disk.offline_export,
                "reason": disk.reason,
            }
            for disk in answer.disks
        ],
    }
