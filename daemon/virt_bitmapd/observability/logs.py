"""structlog, configured in this one place: one event per line of work, the same keys everywhere.

The chain: context variables, level, timestamp, message id, then one renderer: JSON lines on
stdout, a readable console format, or journald's native fields (MESSAGE, PRIORITY,
SYSLOG_IDENTIFIER, MESSAGE_ID, DOMAIN, DISK, ...), so that ``journalctl DOMAIN=vm1`` works.
"""

from __future__ import annotations

import logging
import os
import sys
import uuid
from collections.abc import Mapping, MutableMapping
from typing import Any

import structlog

from .journald import DEFAULT_SOCKET, JournalSender

__all__ = ["JournalRenderer", "add_message_id", "configure", "message_id", "message_kind"]

IDENTIFIER = "virt-bitmapd"
# Message ids are derived from the event name, so they are stable across versions and hosts.
_MESSAGE_ID_NAMESPACE = uuid.UUID("4f1c6a52-8e0b-4d3a-9b7e-2c5d1e9f0a61")
_PRIORITIES = {"debug": 7, "info": 6, "warning": 4, "error": 3, "critical": 2}

EventDict = MutableMapping[str, Any]


def message_id(event: str) -> str:
    """The journald MESSAGE_ID of a kind of event: 32 hex digits, stable for its name."""
    return uuid.uuid5(_MESSAGE_ID_NAMESPACE, event).hex


#: reconciliation errors behind which a QEMU tool died mid-work
_CRASH_KINDS = frozenset({"tool_crashed", "crash_damaged_bitmaps"})


def message_kind(event_dict: Mapping[str, Any]) -> str:
    """The kind of event a MESSAGE_ID stands for: the event's name, but a reconciliation that
    lost bits, could not prove a commit or met a crashed tool, and a checkpoint that became
    untrusted, are kinds of their own (each with its own text in the journal catalog)."""
    event = str(event_dict.get("event", ""))
    if event == "reconciliation":
        if event_dict.get("error_kind") in _CRASH_KINDS:
            return "tool_crashed"
        if event_dict.get("result") in ("unrecoverable", "unproven"):
            return f"commit_{event_dict['result']}"
    if event == "checkpoint_health" and event_dict.get("state") == "untrusted":
        return "checkpoint_untrusted"
    return event


def add_message_id(_: Any, __: str, event_dict: EventDict) -> EventDict:
    event_dict.setdefault("message_id", message_id(message_kind(event_dict)))
    return event_dict


def drop_message_id(_: Any, __: str, event_dict: EventDict) -> EventDict:
    event_dict.pop("message_id", None)
    return event_dict


def _field_name(key: str) -> str:
    name = "".join(c if c.isalnum() else "_" for c in key.upper()).lstrip("_")
    return name or "FIELD"


class JournalRenderer:
    """Turns an event into journald fields; the event name and a summary become MESSAGE."""

    def __call__(self, _: Any, method: str, event_dict: EventDict) -> dict[str, str]:
        event = str(event_dict.pop("event", ""))
        level = str(event_dict.pop("level", method))
        event_dict.pop("timestamp", None)  # journald stamps entries itself
        fields = {
            "MESSAGE": _summary(event, event_dict),
            "PRIORITY": str(_PRIORITIES.get(level, 6)),
            "SYSLOG_IDENTIFIER": IDENTIFIER,
            "EVENT": event,
        }
        for key, value in event_dict.items():
            fields[_field_name(key)] = (
                ",".join(map(str, value)) if isinstance(value, list | tuple) else str(value)
            )
        return fields


def _summary(event: str, event_dict: EventDict) -> str:
    details = " ".join(f"{key}={value}" for key, value in event_dict.items() if key != "message_id")
    return f"{event}: {details}" if details else event


class JournalLogger:
    """The logger at the end of the chain when rendering for journald."""

    def __init__(self, sender: JournalSender) -> None:
        self._sender = sender
        self._fell_back = False

    def _send(self, **fields: str) -> None:
        if self._sender.send(fields):
            return
        # journald gone or entry too large: the line still goes somewhere a person can read it.
        if not self._fell_back:
            self._fell_back = True
            print(
                f"virt-bitmapd: cannot write to journald at {self._sender.path}"
                f" ({self._sender.last_error}); logging to stderr",
                file=sys.stderr,
            )
        print(fields.get("MESSAGE", ""), file=sys.stderr, flush=True)

    debug = info = warning = error = critical = msg = _send


def configure(
    log_format: str = "auto", level: str = "info", *, journal_socket: str | None = None
) -> str:
    """Configure structlog once for the process; returns the format chosen for ``auto``."""
    socket_path = journal_socket or os.environ.get("VIRT_BITMAPD_JOURNAL_SOCKET", DEFAULT_SOCKET)
    if log_format == "auto":
        under_journal = "JOURNAL_STREAM" in os.environ and os.path.exists(socket_path)
        log_format = "journal" if under_journal else "json"
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        add_message_id,
    ]
    logger_factory: Any
    if log_format == "journal":
        sender = JournalSender(socket_path)
        processors.append(JournalRenderer())
        logger_factory = lambda *_: JournalLogger(sender)  # noqa: E731
    else:
        processors.append(structlog.processors.TimeStamper(fmt="iso", utc=True))
        if log_format == "console":
            processors.append(drop_message_id)  # for journald; noise for a person reading
            processors.append(structlog.dev.ConsoleRenderer(colors=sys.stdout.isatty()))
        else:
            processors.append(structlog.processors.JSONRenderer())
        logger_factory = structlog.PrintLoggerFactory(sys.stdout)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=logger_factory,
        cache_logger_on_first_use=False,
    )
    return log_format
