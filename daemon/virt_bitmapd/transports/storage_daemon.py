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
import tempfile
from collections.abc import Sequence
from typing import IO

from ..errors import (
    BaseChanged,
    QMPError,
    ToolCrashed,
    ToolFailed,
    TransactionRefused,
    VirtBitmapdError,
)
from ..healing import HealStep
from ..model import Outcome, Plan
from ..qemu_messages import describe_exit, image_error_from_qemu
from ..qmp import blockdev_add, blockdev_del, disable_bitmaps, transaction
from ..qmp_marking import copy_job, heal_transaction, null_node, recording_bitmap
from ..qmp_nodes import NodeBitmaps, find_node, node_bitmaps, query_nodes
from . import children
from .job_wait import wait_for_job
from .qmp_stream import QMPStream

__all__ = [
    "TOP_NODE",
    "Session",
    "apply_at_rest",
    "disable_at_rest",
    "heal_at_rest",
    "run_transaction",
]

TOOL = "qemu-storage-daemon"
BASE_NODE = "vbd-base"
TOP_NODE = "vbd-top"
SINK_NODE = "vbd-sink"  # null-co: discards what it is given, its bitmap records where
ALLOCATION_BITMAP = "vbd-allocation"
HEAL_JOB = "vbd-heal"
JOB_TIMEOUT = 3600.0  # reading a huge overlay's allocated clusters once
STDERR_KEPT = 2000  # characters of the tool's stderr kept in an error


class Session:
    """One qemu-storage-daemon for one job: started and greeted on entry; on exit its nodes are
    closed (the last opened first, so a read-write image stores its bitmaps before anything it
    read from goes) and it is stopped.  A failure inside keeps the first error, with the tool's
    own words added; a failure only at the end is raised with them."""

    def __init__(self, binary: str, timeout: float) -> None:
        self._binary = binary
        # stderr goes to a file: a pipe nobody reads until the end could fill and stall us
        self._errors = tempfile.TemporaryFile()  # noqa: SIM115 - closed by _close
        try:
            self._process = children.start(
                [binary, "--chardev", "stdio,id=vbd-qmp", "--monitor", "chardev=vbd-qmp"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=self._errors,
            )
        except OSError as error:
            self._errors.close()
            raise ToolFailed(f"cannot run {binary}: {error}", retryable=False) from error
        self.qmp = QMPStream(self._process, tool=binary, timeout=timeout)
        self._opened: list[str] = []

    def __enter__(self) -> Session:
        try:
            self.qmp.handshake()
        except BaseException as error:
            self._close(error)
            raise
        return self

    def __exit__(self, _type: object, error: BaseException | None, _trace: object) -> None:
        self._close(error)

    def open(self, node: str, path: str, *, read_only: bool) -> None:
        """Open the qcow2 image ``path`` by itself as ``node``."""
        try:
            self.qmp.execute(blockdev_add(node, path, read_only=read_only))
        except QMPError as error:
            raise image_error_from_qemu(path, error.description) from error
        self._opened.append(node)

    def add(self, command: dict[str, object], node: str) -> None:
        """Add a helper node, closed after every image."""
        self.qmp.execute(command)
        self._opened.insert(0, node)

    def _close(self, failing: BaseException | None) -> None:
        _close(
            self.qmp,
            self._process,
            self._opened,
            binary=self._binary,
            errors=self._errors,
            failing=failing,
        )


def disable_at_rest(
    path: str, names: tuple[str, ...], *, binary: str = TOOL, timeout: float = 60.0
) -> None:
    """Stop bitmaps ``names`` of image ``path`` (no process holds it) recording, in one
    transaction; those already disabled stay so.  Raises a VirtBitmapdError on failure, with
    the image's bitmaps as they were."""
    with Session(binary, timeout) as session:
        session.open(TOP_NODE, path, read_only=False)
        present = node_bitmaps(session.qmp.execute(query_nodes()), TOP_NODE).bitmaps
        recording = tuple(b.name for b in present if b.name in names and b.recording)
        if recording:
            run_transaction(session.qmp, disable_bitmaps(TOP_NODE, recording), path)


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
    with Session(binary, timeout) as session:
        qmp = session.qmp
        session.open(TOP_NODE, path, read_only=False)
        nodes = qmp.execute(query_nodes())
        size = int(find_node(nodes, TOP_NODE)["image"]["virtual-size"])
        present = {b.name for b in node_bitmaps(nodes, TOP_NODE).bitmaps}
        appeared = sorted(present & {step.bitmap for step in steps})
        if appeared:
            raise BaseChanged(path, appeared[0], "appeared")
        session.add(null_node(SINK_NODE, size), SINK_NODE)
        qmp.execute(recording_bitmap(SINK_NODE, ALLOCATION_BITMAP, granularity))
        qmp.execute(copy_job(HEAL_JOB, TOP_NODE, SINK_NODE, only_allocated=True))
        wait_for_job(
            qmp.execute, HEAL_JOB, path, timeout=JOB_TIMEOUT, what="reading its allocation"
        )
        source = (SINK_NODE, ALLOCATION_BITMAP)
        run_transaction(qmp, heal_transaction(TOP_NODE, steps, source=source), path)


def apply_at_rest(plan: Plan, *, binary: str = TOOL, timeout: float = 60.0) -> Outcome:
    """Apply ``plan`` to images no process holds open.  Raises a VirtBitmapdError on failure,
    in which case the base's bitmaps are as they were."""
    if plan.is_empty:
        return Outcome(plan=plan, merges=())
    source_nodes = {path: f"vbd-src-{index}" for index, path in enumerate(plan.source_images)}
    with Session(binary, timeout) as session:
        for path, node in source_nodes.items():
            session.open(node, path, read_only=True)
        session.open(BASE_NODE, plan.base, read_only=False)
        before = _base_bitmaps(session.qmp)
        _check_base_matches_plan(plan, before)
        command = transaction(plan, base_node=BASE_NODE, source_nodes=source_nodes)
        run_transaction(session.qmp, command, plan.base)
        after = _base_bitmaps(session.qmp)
    return Outcome.from_counts(plan, before.dirty_bytes, after.dirty_bytes)


def run_transaction(qmp: QMPStream, command: dict[str, object], path: str) -> None:
    """Run one transaction; QEMU's refusal is TransactionRefused naming ``path``."""
    try:
        qmp.execute(command)
    except QMPError as error:
        raise TransactionRefused(path, error.description) from error


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
    failing: BaseException | None,
) -> None:
    """Close the nodes (the last opened first) and stop the daemon.  The tool's own words (its
    stderr, bounded) and how it ended are kept: added to ``failing`` (the error already on its
    way: the first is the one worth reporting), else raised when the end itself failed."""
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
    children.ended(process)
    if failure is None and process.returncode != 0:
        failure = f"{binary} {describe_exit(process.returncode)}"
    errors.seek(0)
    said = errors.read().decode(errors="replace").strip()[-STDERR_KEPT:]
    errors.close()
    if failing is not None:
        if said and isinstance(failing, VirtBitmapdError):
            failing.add_note(f"{binary} said: {said}")
        return
    if failure is None:
        return
    ended = f"{binary} {describe_exit(process.returncode)}"
    detail = f"{ended}{'; it said: ' + said if said else ''}"
    if process.returncode is not None and process.returncode < 0:
        raise ToolCrashed(f"{failure}; {detail}")
    raise ToolFailed(f"{failure}; {detail}")
