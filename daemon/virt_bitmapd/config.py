"""Settings: defaults, then the TOML file, then command-line flags.

Every mistake in the file is reported as ``FILE:KEY: reason``, all of them at once, so an
administrator fixes the file in one pass.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from .storage_roots import root_problem

__all__ = ["DEFAULT_PATH", "ConfigError", "Settings", "load", "parse_listen"]

DEFAULT_PATH = "/etc/virt-bitmapd/config.toml"
LOG_FORMATS = ("auto", "journal", "json", "console")
LOG_LEVELS = ("debug", "info", "warning", "error")
UNTRUSTED_POLICIES = ("fill", "disable", "report")


class ConfigError(Exception):
    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    uri: str = "qemu:///system"
    storage_roots: tuple[str, ...] = ("/var/lib/libvirt/images",)
    state_dir: str = "/var/lib/virt-bitmapd"
    rescan_interval: float = 300.0
    snapshot_watch_interval: float = 120.0
    #: Watch the directories of the known layers and the storage roots (inotify).
    watch: bool = True
    concurrency: int = 4
    #: Where ``virt-bitmapd check`` asks the daemon for a look ("": nowhere).
    control_socket: str = "/run/virt-bitmapd/control.sock"
    metrics_listen: str = "127.0.0.1:9411"
    log_format: str = "auto"
    log_level: str = "info"
    #: What to do with a bitmap whose bits cannot be proven complete: "fill" it (every bit set:
    #: every reader copies the whole disk once; disabled where filling fails), "disable" it
    #: (libvirt then refuses an incremental backup from its checkpoint) or only "report" it.
    untrusted_policy: str = "fill"
    #: Heal, at rest, broken checkpoints that ``heal`` can rebuild without under-reporting.
    heal: bool = False
    #: Where the settings came from, for messages.
    source: str = field(default="defaults", compare=False)


def parse_listen(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6) -> (host, port).  Raises ValueError."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not port_text.isdigit():
        raise ValueError("expected HOST:PORT, e.g. 127.0.0.1:9411")
    port = int(port_text)
    if not 0 < port < 65536:
        raise ValueError(f"port {port} is not between 1 and 65535")
    host = host.removeprefix("[").removesuffix("]")
    if host and host != "localhost":
        try:
            ipaddress.ip_address(host)
        except ValueError as error:
            raise ValueError(f"{host!r} is not an IP address") from error
    return host, port


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError("must be a string")
    return value


def _uri(value: Any) -> str:
    text = _text(value)
    if "://" not in text:
        raise ValueError(f"{text!r} is not a libvirt URI (e.g. qemu:///system)")
    return text


def _absolute(value: Any) -> str:
    text = _text(value)
    if not os.path.isabs(text):
        raise ValueError(f"{text!r} is not an absolute path")
    return os.path.normpath(text)


def _socket_path(value: Any) -> str:
    text = _text(value)
    if not text:
        return text
    path = _absolute(text)
    if len(path.encode()) > 107:  # sun_path holds 108 bytes with the final NUL
        raise ValueError(f"{text!r} is longer than a Unix socket path may be (107 bytes)")
    return path


def _roots(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise TypeError("must be a list of absolute paths")
    for item in value:
        problem = root_problem(_text(item))
        if problem is not None:
            raise ValueError(problem)
    return tuple(_absolute(item) for item in value)


def _interval(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError("must be a number of seconds")
    if not 1 <= value <= 86400:
        raise ValueError(f"{value} is not between 1 and 86400 seconds")
    return float(value)


def _watch_interval(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError("must be a number of seconds")
    if value != 0 and not 1 <= value <= 3600:
        raise ValueError(f"{value} is not 0 (off) or between 1 and 3600 seconds")
    return float(value)


def _concurrency(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError("must be a whole number")
    if not 1 <= value <= 64:
        raise ValueError(f"{value} is not between 1 and 64")
    return value


def _flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError("must be true or false")
    return value


def _listen(value: Any) -> str:
    text = _text(value)
    if text:
        parse_listen(text)
    return text


def _choice(choices: tuple[str, ...]) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        text = _text(value)
        if text not in choices:
            raise ValueError(f"{text!r} is not one of {', '.join(choices)}")
        return text

    return check


#: section -> key -> (Settings field, validator)
SCHEMA: Mapping[str, Mapping[str, tuple[str, Callable[[Any], Any]]]] = {
    "libvirt": {"uri": ("uri", _uri)},
    "storage": {"roots": ("storage_roots", _roots)},
    "daemon": {
        "state_dir": ("state_dir", _absolute),
        "rescan_interval": ("rescan_interval", _interval),
        "snapshot_watch_interval": ("snapshot_watch_interval", _watch_interval),
        "watch": ("watch", _flag),
        "concurrency": ("concurrency", _concurrency),
        "control_socket": ("control_socket", _socket_path),
    },
    "metrics": {"listen": ("metrics_listen", _listen)},
    "log": {
        "format": ("log_format", _choice(LOG_FORMATS)),
        "level": ("log_level", _choice(LOG_LEVELS)),
    },
    "policy": {
        "untrusted": ("untrusted_policy", _choice(UNTRUSTED_POLICIES)),
        "heal": ("heal", _flag),
    },
}


#: Settings fields whose flag is not the field's name
FLAGS = {"storage_roots": "storage-root", "untrusted_policy": "untrusted"}

#: Settings field -> validator, for flags
VALIDATORS: Mapping[str, Callable[[Any], Any]] = {
    name: check for keys in SCHEMA.values() for name, check in keys.values()
}


def _from_document(document: Mapping[str, Any], where: str) -> tuple[dict[str, Any], list[str]]:
    values: dict[str, Any] = {}
    problems: list[str] = []
    for section, content in document.items():
        if section not in SCHEMA:
            problems.append(f"{where}:{section}: unknown section (known: {', '.join(SCHEMA)})")
            continue
        if not isinstance(content, dict):
            problems.append(f"{where}:{section}: must be a table ([{section}])")
            continue
        for key, value in content.items():
            if key not in SCHEMA[section]:
                known = ", ".join(SCHEMA[section])
                problems.append(f"{where}:{section}.{key}: unknown key (known: {known})")
                continue
            name, validate = SCHEMA[section][key]
            try:
                values[name] = validate(value)
            except (TypeError, ValueError) as error:
                problems.append(f"{where}:{section}.{key}: {error}")
    return values, problems


def load(path: str | None, overrides: Mapping[str, Any] | None = None) -> Settings:
    """Defaults, then ``path`` (skipped when None, or when it is the default path and absent),
    then ``overrides`` (flags, already typed; None values are ignored).  Raises ConfigError."""
    settings = Settings()
    if path is not None:
        try:
            with open(path, "rb") as stream:
                document = tomllib.load(stream)
        except FileNotFoundError:
            if path != DEFAULT_PATH:
                raise ConfigError([f"{path}: no such file"]) from None
            document = None
        except tomllib.TOMLDecodeError as error:
            raise ConfigError([f"{path}: not valid TOML: {error}"]) from None
        except OSError as error:
            raise ConfigError([f"{path}: cannot be read: {error.strerror}"]) from None
        if document is not None:
            values, problems = _from_document(document, path)
            if problems:
                raise ConfigError(problems)
            settings = replace(settings, source=path, **values)
    if overrides:
        chosen = {k: v for k, v in overrides.items() if v is not None and k in VALIDATORS}
        problems = []
        for name, value in chosen.items():
            try:
                chosen[name] = VALIDATORS[name](list(value) if isinstance(value, tuple) else value)
            except (TypeError, ValueError) as error:
                flag = FLAGS.get(name, name.replace("_", "-"))
                problems.append(f"--{flag}: {error}")
        if problems:
            raise ConfigError(problems)
        settings = replace(settings, **chosen)
    return settings
