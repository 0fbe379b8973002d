"""`virt-bitmapd check`'s own mistakes are monitoring plugins' UNKNOWN (3), never 1 or 2."""

from __future__ import annotations

import pytest

from virt_bitmapd.cli import main


def test_a_mistake_in_the_arguments_is_unknown(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as usage:
        main(["check"])  # no domain
    assert usage.value.code == 3
    assert main(["check", "vm1", "--wait", "-1"]) == 3
    assert capsys.readouterr().out.startswith("UNKNOWN: vm1: cannot be judged now: --wait -1")


def test_other_commands_keep_the_usual_usage_status() -> None:
    with pytest.raises(SystemExit) as usage:
        main(["status", "--bogus"])
    assert usage.value.code == 2
