"""Apply a Plan to images at rest: one qemu-storage-daemon, one QMP transaction.

Order matters for safety.  The sources are opened read-only first, then the base read-write,
so a source that cannot be opened stops everything before the base is touched.  The base's
bitmaps are then compared with what the plan assumed (the image may have changed since it was
read); the transaction runs only if they agree, and it is all or nothing.  Whatever happens, the
nodes are closed before the daemon quits, which writes the bitmaps back cleanly; an unclean stop
would leave them flagged in-use, which readers treat as inconsistent (visibly broken, never
silently incomplete).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import IO

from ..errors import (
    BaseChanged,
    QMPError,
    ToolCrashed,
    ToolFailed,
    TransactionRefused,
    VirtBitmapdError,
    describe_exit,
    image_error_from_qemu,
)
from ..healing import HealStep
from ..model import Outcome, Plan
from ..qmp import (
    NodeBitmaps,
    blockdev_add,
    blockdev_del,
    copy_allocated,
    disable_bitmaps,
    find_node,
    heal_transaction,
    node_bitmaps,
    null_sink,
    query_nodes,
    transaction,
)
from .qmp_stream import QMPStream

__all__ = ["apply_at_rest", "disable_at_rest", "heal_at_rest"]

TOOL = "qemu-storage-daemon"
BASE_NODE = "vbd-base"
TOP_NODE = "vbd-top"
SINK_NODE = "vbd-sink"  # null-co: discards what it is given, its bitmap records where
ALLOCATION_BITMAP = "vbd-allocation"
HEAL_JOB = "vbd-heal"
JOB_POLL = 0.05  # seconds between looks at the copy job
JOB_TIMEOUT = 3600.0  # reading a huge overlay's allocated clusters once
STDERR_KEPT = 2000  # characters of the tool's stderr kept in an error


def _start(binary: str) -> tuple[subprocess.Popen[bytes], IO[bytes]]:
    # stderr goes to a file: a pipe nobody reads until the end could fill and stall the daemon
    errors = tempfile.TemporaryFile()  # noqa: SIM115 - closed by _close
    try:
        process = subprocess.Popen(
            [binary, "--chardev", "stdio,id=vbd-qmp", "--monitor", "chardev=vbd-qmp"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=errors,
        )
    except OSError as error:
        errors.close()
        raise ToolFailed(f"cannot run {binary}: {error}", retryable=False) from error
    return process, errors


def disable_at_rest(
    path: str, names: tuple[str, ...], *, binary: str = TOOL, timeout: float = 60.0
) -> None:
    """Stop bitmaps ``names`` of image ``path`` (no process holds it) recording, in one
    transaction; those already disabled stay so.  Raises a VirtBitmapdError on failure, with
    the image's bitmaps as they were."""
    process, errors = _start(binary)
    qmp = QMPStream(process, tool=binary, timeout=timeout)
    opened: list[str] = []
    try:
        qmp.handshake()
        _open(qmp, blockdev_add(TOP_NODE, path, read_only=False), path)
        opened.append(TOP_NODE)
        present = node_bitmaps(qmp.execute(query_nodes()), TOP_NODE).bitmaps
        recording = tuple(b.name for b in present if b.name in names and b.recording)
        if recording:
            try:
                qmp.execute(disable_bitmaps(TOP_NODE, recording))
            except QMPError as error:
                raise TransactionRefused(path, error.description) from error
    except BaseException:
        _close(qmp, process, opened, binary=binary, errors=errors, quiet=True)
        raise
    _close(qmp, process, opened, binary=binary, errors=errors, quiet=False)


def heal_at_rest(
    path: str, steps: Sequence[HealStep], *, binary: str = TOOL, timeout: float = 60.0
) -> None:
    """Create each step's bitmap in image ``path`` (no process holds it) marking every cluster
    the image itself allocates, in one transaction.

    QEMU has no command that sets a bitmap from an allocation map, so it is recorded: a
    ``blockdev-backup`` with ``sync=top`` copies exactly the clusters the image allocates (its
    backing is not opened) to a ``null-co`` node, which discards the data while a bitmap on it
    records every write, zero clusters included; that bitmap is then merged into the new ones.
    The image's data is read once and never written."""
    if not steps:
        return
    granularity = min(step.granularity for step in steps)
    process, errors = _start(binary)
    qmp = QMPStream(process, tool=binary, timeout=timeout)
    opened: list[str] = []
    try:
        qmp.handshake()
        _open(qmp, blockdev_add(TOP_NODE, path, read_only=False), path)
        opened.append(TOP_NODE)
        nodes = qmp.execute(query_nodes())
        size = int(find_node(nodes, TOP_NODE)["image"]["virtual-size"])
        present = {b.name for b in node_bitmaps(nodes, TOP_NODE).bitmaps}
        appeared = sorted(present & {step.bitmap for step in steps})
        if appeared:
            raise BaseChanged(path, appeared[0], "appeared")
        qmp.execute(null_sink(SINK_NODE, size))
        opened.insert(0, SINK_NODE)  # closed last: the image first stores its bitmaps
        qmp.execute(
            {
                "execute": "block-dirty-bitmap-add",
                "arguments": {
                    "node": SINK_NODE,
                    "name": ALLOCATION_BITMAP,
                    "granularity": granularity,
                    "persistent": False,
                },
            }
        )
        qmp.execute(copy_allocated(HEAL_JOB, TOP_NODE, SINK_NODE))
        _wait_for_job(qmp, path)
        try:
            qmp.execute(heal_transaction(TOP_NODE, steps, source=(SINK_NODE, ALLOCATION_BITMAP)))
        except QMPError as error:
            raise TransactionRefused(path, error.description) from error
    except BaseException:
        _close(qmp, process, opened, binary=binary, errors=errors, quiet=True)
        raise
    _close(qmp, process, opened, binary=binary, errors=errors, quiet=False)


def _wait_for_job(qmp: QMPStream, path: str) -> None:
    """Until the copy job concludes; raises ToolFailed with QEMU's words when it failed."""
    deadline = time.monotonic() + JOB_TIMEOUT
    while True:
        jobs = [job for job in qmp.execute({"execute": "query-jobs"}) if job["id"] == HEAL_JOB]
        if not jobs or jobs[0]["status"] == "concluded":
            break
        if time.monotonic() > deadline:
            raise ToolFailed(f"{path}: reading its allocation took over {JOB_TIMEOUT:.0f} s")
        time.sleep(JOB_POLL)
    qmp.execute({"execute": "job-dismiss", "arguments": {"id": HEAL_JOB}})
    if jobs and jobs[0].get("error"):
        raise image_error_from_qemu(path, str(jobs[0]["error"]))


def apply_at_rest(plan: Plan, *, binary: str = TOOL, timeout: float = 60.0) -> Outcome:
    """Apply ``plan`` to images no process holds open.  Raises a VirtBitmapdError on failure,
    in which case the base's bitmaps are as they were."""
    if plan.is_empty:
        return Outcome(plan=plan, merges=())
    source_nodes = {path: f"vbd-src-{index}" for index, path in enumerate(plan.source_images)}
    process, errors = _start(binary)
    qmp = QMPStream(process, tool=binary, timeout=timeout)
    opened: list[str] = []
    try:
        qmp.handshake()
        for path, node in source_nodes.items():
            _open(qmp, blockdev_add(node, path, read_only=True), path)
            opened.append(node)
        _open(qmp, blockdev_add(BASE_NODE, plan.base, read_only=False), plan.base)
        opened.append(BASE_NODE)
        before = _base_bitmaps(qmp)
        _check_base_matches_plan(plan, before)
        try:
            qmp.execute(transaction(plan, base_node=BASE_NODE, source_nodes=source_nodes))
        except QMPError as error:
            raise TransactionRefused(plan.base, error.description) from error
        after = _base_bitmaps(qmp)
    except BaseException:
        # The first error is the one worth reporting; closing is best effort then.
        _close(qmp, process, opened, binary=binary, errors=errors, quiet=True)
        raise
    _close(qmp, process, opened, binary=binary, errors=errors, quiet=False)
    return Outcome.from_counts(plan, before.dirty_bytes, after.dirty_bytes)


def _open(qmp: QMPStream, command: dict[str, object], path: str) -> None:
    try:
        qmp.execute(command)
    except QMPError as error:
        raise image_error_from_qemu(path, error.description) from error


def _base_bitmaps(qmp: QMPStream) -> NodeBitmaps:
    nodes = qmp.execute(query_nodes())
    return node_bitmaps(nodes, BASE_NODE)


def _check_base_matches_plan(plan: Plan, base: NodeBitmaps) -> None:
    mismatch = plan.mismatch(base.bitmaps)
    if mismatch is not None:
        raise BaseChanged(plan.base, *mismatch)


def _close(
    qmp: QMPStream,
    process: subprocess.Popen[bytes],
    nodes: list[str],
    *,
    binary: str,
    errors: IO[bytes],
    quiet: bool,
) -> None:
    """Close the nodes (the base first, which stores its bitmaps) and stop the daemon.  On a
    failure the tool's own words (its stderr, bounded) and how it ended are kept: raised when
    ``quiet`` is false, else its words are added to the error being raised (``add_note``)."""
    failure: str | None = None
    try:
        for node in reversed(nodes):
            qmp.execute(blockdev_del(node))
        qmp.execute({"execute": "quit"})
    except (QMPError, ToolFailed) as error:
        failure = str(error)
    try:
        process.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        failure = failure or f"{binary} did not stop"
    if failure is None and process.returncode != 0:
        failure = f"{binary} {describe_exit(process.returncode)}"
    errors.seek(0)
    said = errors.read().decode(errors="replace").strip()[-STDERR_KEPT:]
    errors.close()
    if quiet:
        if said:
            _current_error_note(f"{binary} said: {said}")
        return
    if failure is None:
        return
    ended = f"{binary} {describe_exit(process.returncode)}"
    detail = f"{ended}{'; it said: ' + said if said else ''}"
    if process.returncode is not None and process.returncode < 0:
        raise ToolCrashed(f"{failure}; {detail}")
    raise ToolFailed(f"{failure}; {detail}")


def _current_error_note(detail: str) -> None:
    """Add the tool's words to the exception being handled, so they reach the log."""
    error = sys.exc_info()[1]
    if isinstance(error, VirtBitmapdError):
        error.add_note(detail)
