"""Both readers, run over every checkpoint of a life, and what they add up to."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .content import changed
from .oracle import Reader, offline_export, offline_status_of, online_backup, status_of

if TYPE_CHECKING:
    from .life import Life


@dataclass
class Figures:
    operations: int = 0
    commits: int = 0
    online: Reader = field(default_factory=Reader)
    offline: Reader = field(default_factory=Reader)
    #: health warnings the daemon logged while a backup job ran (there must be none)
    job_warnings: int = 0
    #: how the daemon's reconciliations ended, by result
    results: dict[str, int] = field(default_factory=dict)
    #: the operations done, by kind
    done: dict[str, int] = field(default_factory=dict)
    #: why each reconciliation the daemon could not prove a commit was so
    unproven: list[str] = field(default_factory=list)
    #: `virt-bitmapd heal` run by hand: healed, or refused
    heals: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


def status_now(life: Life, checkpoint: str) -> str:
    config = None if life.daemon is None else life.daemon.config
    return status_of(life.name, config, checkpoint)


def back_up_online(life: Life) -> None:
    """libvirt's backup from every checkpoint; a refused one must have been foreseen by
    `status`, and the tool then forgets the checkpoint (it takes a full backup)."""
    now = life.content.read()
    reader = life.figures.online
    for name in list(life.taken_at):
        exported = online_backup(life.name, life.folder, name)
        status = status_now(life, name)
        if exported is None:
            reader.backups += 1
            reader.refused += 1
            if status.split(":")[0] in ("untrusted", "missing", "broken"):
                reader.foreseen += 1
            else:
                reader.misses.append(f"refused {name}: status said {status}")
            life.forget(name)
            continue
        reader.judge(name, exported, changed(life.taken_at[name], now), status)


def back_up_offline(life: Life) -> None:
    """At rest: the offline export of every checkpoint.  One whose offline export `status` does
    not call safe (or complete) is one an offline tool must not take an incremental from:
    foreseen, whatever it holds."""
    now = life.content.read()
    reader = life.figures.offline
    config = None if life.daemon is None else life.daemon.config
    for name, then in life.taken_at.items():
        status = offline_status_of(life.name, config, name)
        exported = offline_export(life.chain[0], name)
        if life.daemon is not None and status.split(":")[0] not in ("safe", "complete"):
            reader.backups += 1
            reader.foreseen += 1
            continue
        if exported is None:
            reader.backups += 1
            reader.refused += 1
            if life.daemon is not None:
                reader.misses.append(f"offline export of {name} refused; status said {status}")
            continue
        reader.judge(name, exported, changed(then, now), status)
