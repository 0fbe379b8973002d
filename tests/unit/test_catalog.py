"""The journal catalog: one entry per kind of event that needs explaining, under the very
MESSAGE_ID the daemon logs it with."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from virt_bitmapd.observability.logs import message_id, message_kind

CATALOG = Path(__file__).resolve().parents[2] / "systemd" / "virt-bitmapd.catalog"

#: the kinds the catalog explains (a reconciliation, and what needs an administrator's eye)
EXPLAINED = (
    "reconciliation",
    "commit_unrecoverable",
    "commit_unproven",
    "tool_crashed",
    "checkpoint_untrusted",
    "checkpoint_quarantined",
    "checkpoint_filled",
    "checkpoint_healed",
)


def entries() -> dict[str, dict[str, str]]:
    """MESSAGE_ID -> its headers and body."""
    text = "\n".join(line for line in CATALOG.read_text().splitlines() if not line.startswith("#"))
    found = {}
    for block in re.split(r"^-- ", text, flags=re.MULTILINE)[1:]:
        head, _, body = block.partition("\n\n")
        first, *headers = head.splitlines()
        fields = dict(h.split(": ", 1) for h in headers)
        found[first.strip()] = {**fields, "body": body.strip()}
    return found


def test_every_kind_explained_has_its_entry_and_nothing_else_is_there() -> None:
    found = entries()
    assert set(found) == {message_id(kind) for kind in EXPLAINED}
    for entry in found.values():
        assert entry["Defined-By"] == "virt-bitmapd" and entry["Subject"] and entry["body"]
        assert "What to do" in entry["body"] or "Nothing to do" in entry["body"], entry


@pytest.mark.parametrize(
    ("fields", "kind"),
    [
        ({"event": "reconciliation", "result": "reconciled"}, "reconciliation"),
        ({"event": "reconciliation", "result": "failed"}, "reconciliation"),
        ({"event": "reconciliation", "result": "unrecoverable"}, "commit_unrecoverable"),
        ({"event": "reconciliation", "result": "unproven"}, "commit_unproven"),
        (
            {"event": "reconciliation", "result": "failed", "error_kind": "tool_crashed"},
            "tool_crashed",
        ),
        (
            {"event": "reconciliation", "result": "failed", "error_kind": "crash_damaged_bitmaps"},
            "tool_crashed",
        ),
        ({"event": "checkpoint_health", "state": "untrusted"}, "checkpoint_untrusted"),
        ({"event": "checkpoint_health", "state": "broken"}, "checkpoint_health"),
        ({"event": "checkpoint_quarantined"}, "checkpoint_quarantined"),
    ],
)
def test_the_kind_of_an_event(fields: dict[str, str], kind: str) -> None:
    assert message_kind(fields) == kind
