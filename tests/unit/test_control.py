"""The control socket: one JSON line each way, answered once the look has ended."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest

from virt_bitmapd.control_client import LookFailed, ask_for_look
from virt_bitmapd.service.control import ControlServer


async def serve(path: Path, look_now: object, client: object) -> object:
    server = ControlServer(str(path), look_now)  # type: ignore[arg-type]
    await server.start()
    try:
        return await asyncio.to_thread(client)  # type: ignore[arg-type]
    finally:
        await server.close()


def test_a_look_is_answered_with_the_disks_once_it_ended(tmp_path: Path) -> None:
    path = tmp_path / "run" / "control.sock"
    asked: list[tuple[str, float]] = []

    async def look_now(name: str, timeout: float) -> list[str]:
        asked.append((name, timeout))
        await asyncio.sleep(0.05)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        return ["vda", "vdb"]

    looked = asyncio.run(serve(path, look_now, lambda: ask_for_look(str(path), "vm1", 7.0)))
    assert looked == ["vda", "vdb"] and asked == [("vm1", 7.0)]
    assert not path.exists()  # removed on close


def test_a_look_that_fails_is_an_error_for_the_caller(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"

    async def look_now(name: str, timeout: float) -> list[str]:
        raise LookFailed(f"{name}: the look did not end within {timeout:g} s")

    def client() -> str:
        with pytest.raises(LookFailed) as caught:
            ask_for_look(str(path), "vm1", 1.0)
        return str(caught.value)

    assert asyncio.run(serve(path, look_now, client)) == "vm1: the look did not end within 1 s"


def test_a_malformed_request_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"

    async def look_now(name: str, timeout: float) -> list[str]:
        raise AssertionError("no look for a malformed request")

    def client() -> bytes:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(str(path))
            sock.sendall(b'{"look": 3}\n')
            return sock.makefile("rb").readline()

    assert b"expected one line" in asyncio.run(serve(path, look_now, client))  # type: ignore[operator]


def test_a_stale_socket_is_replaced_and_anything_else_is_left(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stale:
        stale.bind(str(path))  # left by an earlier run

    async def look_now(name: str, timeout: float) -> list[str]:
        return ["vda"]

    assert asyncio.run(serve(path, look_now, lambda: ask_for_look(str(path), "vm1", 1.0))) == [
        "vda"
    ]
    path.write_text("not ours")
    server = ControlServer(str(path), look_now)
    asyncio.run(server.start())  # logged, not raised: check then judges without the daemon
    assert path.read_text() == "not ours"


def test_no_daemon_is_an_os_error(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        ask_for_look(str(tmp_path / "none.sock"), "vm1", 1.0)


CLIENT = """
import socket, sys
with socket.socket(socket.AF_UNIX) as sock:
    sock.connect(sys.argv[1])
    sock.sendall(b'{"look": "vm1"}\\n')
    print(sock.makefile().readline())
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as another user")
def test_only_root_is_answered_even_through_a_socket_opened_to_all() -> None:
    folder = tempfile.mkdtemp(prefix="vbd-control-")  # not under pytest's root-only folder
    path = Path(folder) / "control.sock"
    looked: list[str] = []

    async def look_now(name: str, timeout: float) -> list[str]:
        looked.append(name)
        return ["vda"]

    def client() -> str:
        os.chmod(folder, 0o755)
        os.chmod(path, 0o666)  # as if someone loosened the socket's mode
        result = subprocess.run(
            ["/usr/bin/python3", "-c", CLIENT, str(path)],  # the project's may be root's only
            capture_output=True,
            text=True,
            check=True,
            user=65534,
            cwd=folder,
        )
        return result.stdout

    try:
        said = asyncio.run(serve(path, look_now, client))
    finally:
        shutil.rmtree(folder)
    assert "only root may ask for a look" in str(said) and looked == []
