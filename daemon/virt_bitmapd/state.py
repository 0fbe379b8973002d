"""Each disk's last known chain, kept in the state directory so it survives restarts.

One JSON file per domain (named by its UUID), replaced atomically (write, fsync, rename), so a
crash leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["DomainState", "StateStore"]

FORMAT_VERSION = 1


@dataclass(slots=True)
class DomainState:
    uuid: str
    name: str
    #: disk target -> chain paths, top first
    chains: dict[str, tuple[str, ...]] = field(default_factory=dict)


class StateStore:
    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory) / "domains"

    def _path(self, uuid: str) -> Path:
        if not uuid or "/" in uuid or uuid.startswith("."):
            raise ValueError(f"not a domain UUID: {uuid!r}")
        return self.directory / f"{uuid}.json"

    def load(self, uuid: str) -> DomainState | None:
        try:
            raw = json.loads(self._path(uuid).read_text())
        except FileNotFoundError:
            return None
        return DomainState(
            uuid=uuid,
            name=str(raw["name"]),
            chains={disk: tuple(chain) for disk, chain in raw["chains"].items()},
        )

    def save(self, state: DomainState) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        document = {
            "version": FORMAT_VERSION,
            "name": state.name,
            "chains": {disk: list(chain) for disk, chain in sorted(state.chains.items())},
        }
        target = self._path(state.uuid)
        handle, temporary = tempfile.mkstemp(dir=self.directory, prefix=".tmp-", suffix=".json")
        try:
            with os.fdopen(handle, "w") as stream:
                json.dump(document, stream, indent=2)
                stream.flush()
                os.fsync(stream.fileno())
            os.replace(temporary, target)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        directory = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)

    def forget(self, uuid: str) -> None:
        self._path(uuid).unlink(missing_ok=True)

    def known(self) -> list[str]:
        if not self.directory.is_dir():
            return []
        return sorted(path.stem for path in self.directory.glob("*.json"))
