"""The config file: defaults, overrides, and every kind of mistake as FILE:KEY: reason."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from virt_bitmapd.config import SCHEMA, ConfigError, Settings, load

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "config" / "config.toml"


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return str(path)


def test_shipped_config_holds_the_defaults() -> None:
    assert load(str(SHIPPED)) == Settings()


def test_flags_override_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[daemon]\nconcurrency = 2\nrescan_interval = 60\n")
    settings = load(path, {"concurrency": 8, "uri": None, "storage_roots": ("/srv/images",)})
    assert settings.concurrency == 8
    assert settings.rescan_interval == 60
    assert settings.storage_roots == ("/srv/images",)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("[daemon]\nconcurency = 2\n", "daemon.concurency: unknown key"),
        ("[deamon]\n", "deamon: unknown section"),
        ("[daemon]\nconcurrency = '2'\n", "daemon.concurrency: must be a whole number"),
        ("[daemon]\nconcurrency = 0\n", "daemon.concurrency: 0 is not between 1 and 64"),
        ("[daemon]\nrescan_interval = true\n", "daemon.rescan_interval: must be a number"),
        (
            "[daemon]\nsnapshot_watch_interval = 0.5\n",
            "daemon.snapshot_watch_interval: 0.5 is not 0 (off) or between 1 and 3600",
        ),
        (
            "[daemon]\nstate_dir = 'relative/dir'\n",
            "daemon.state_dir: 'relative/dir' is not an absolute",
        ),
        ("[storage]\nroots = '/x'\n", "storage.roots: must be a list"),
        ("[storage]\nroots = ['/']\n", "storage.roots: '/' is the whole file system"),
        ("[libvirt]\nuri = 'qemu'\n", "libvirt.uri: 'qemu' is not a libvirt URI"),
        ("[metrics]\nlisten = '127.0.0.1'\n", "metrics.listen: expected HOST:PORT"),
        ("[metrics]\nlisten = 'example.org:80'\n", "metrics.listen: 'example.org' is not an IP"),
        ("[metrics]\nlisten = '127.0.0.1:70000'\n", "metrics.listen: port 70000"),
        ("[log]\nlevel = 'loud'\n", "log.level: 'loud' is not one of"),
        ("[log]\nformat = 'xml'\n", "log.format: 'xml' is not one of"),
        ("[policy]\nuntrusted = 'delete'\n", "policy.untrusted: 'delete' is not one of"),
        ("[policy]\nheal = 'yes'\n", "policy.heal: must be true or false"),
        ("[daemon]\ncontrol_socket = 'run/x.sock'\n", "daemon.control_socket: 'run/x.sock' is not"),
        (
            f"[daemon]\ncontrol_socket = '/{'x' * 110}'\n",
            "daemon.control_socket: '/xxx",
        ),
        ("daemon = 3\n", "daemon: must be a table"),
    ],
)
def test_each_mistake_names_file_and_key(tmp_path: Path, text: str, problem: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load(path)
    assert len(caught.value.problems) == 1
    assert caught.value.problems[0].startswith(f"{path}:{problem}")


def test_all_mistakes_are_reported_at_once(tmp_path: Path) -> None:
    path = write(tmp_path, "[daemon]\nconcurrency = 0\nfoo = 1\n[log]\nlevel = 'x'\n")
    with pytest.raises(ConfigError) as caught:
        load(path)
    assert len(caught.value.problems) == 3


def test_broken_toml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        load(write(tmp_path, "[daemon\n"))
    with pytest.raises(ConfigError, match="no such file"):
        load(str(tmp_path / "absent.toml"))


def test_every_setting_is_documented_in_the_shipped_config() -> None:
    text = SHIPPED.read_text()
    for section, keys in SCHEMA.items():
        assert f"[{section}]" in text
        for key in keys:
            assert f"#{key} = " in text, f"{section}.{key} is not shown with its default"


def test_snapshot_watch_can_be_turned_off(tmp_path: Path) -> None:
    path = write(tmp_path, "[daemon]\nsnapshot_watch_interval = 0\n")
    assert load(path).snapshot_watch_interval == 0
    assert load(None, {"snapshot_watch_interval": 10}).snapshot_watch_interval == 10


def test_untrusted_policy_from_file_and_flag(tmp_path: Path) -> None:
    path = write(tmp_path, "[policy]\nuntrusted = 'report'\n")
    assert load(path).untrusted_policy == "report"
    assert load(path, {"untrusted_policy": "disable"}).untrusted_policy == "disable"
    with pytest.raises(ConfigError, match="--untrusted: 'x' is not one of"):
        load(None, {"untrusted_policy": "x"})
    assert load(None).heal is False and load(None, {"heal": True}).heal is True


def test_bad_flag_is_named() -> None:
    with pytest.raises(ConfigError, match="--concurrency: 99 is not between"):
        load(None, {"concurrency": 99})


def test_check_config_command(tmp_path: Path) -> None:
    def check(path: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "virt_bitmapd.cli", "check-config", path],
            capture_output=True,
            text=True,
            check=False,
        )

    good = check(str(SHIPPED))
    assert good.returncode == 0 and "ok" in good.stdout
    bad_path = write(tmp_path, "[daemon]\nconcurrency = -1\n")
    bad = check(bad_path)
    assert bad.returncode == 2
    assert bad.stderr.strip() == f"{bad_path}:daemon.concurrency: -1 is not between 1 and 64"
