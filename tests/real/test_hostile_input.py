"""What a guest or a stray file can write never steers virt-bitmapd.

Guests write their disks' bytes (a raw disk's first bytes can be a forged qcow2 header naming
any backing file, an NBD socket, a json: pseudo-filename); local users leave files in the
storage roots; libvirt clients write domain XML.  Every case runs on real images, the daemon
ones on a real libvirtd, and checks three things: the outcome is a clear error that names the
image (or, beside a hostile file, a reconciliation with every bit), no image changed (content
hash), and nothing connected to the NBD socket a forged header names.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from helpers.images import (
    K64,
    ChainBuilder,
    MiB,
    add_bitmap,
    bitmap_names,
    create,
    dirty_extents,
    expected,
    filled,
    run,
    state,
    virtual_size,
    write,
)
from helpers.libvirt_env import Domains, stop_gracefully
from helpers.scenarios import build, is_for

pytestmark = pytest.mark.real

CLI = [sys.executable, "-m", "virt_bitmapd.cli"]
EVERYTHING = [(0, K64), (2 * MiB, 2 * K64), (9 * MiB, K64)]


# ------------------------------------------------------------------ tools


def cli(*args: str, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*prefix, *CLI, *args], capture_output=True, text=True, check=False, timeout=120
    )


def digest(*paths: Path) -> dict[str, str]:
    """Content hashes: what "no image changed" is checked against."""
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in paths if p.is_file()}


class NbdTrap:
    """A unix socket a forged header names; counts who connects."""

    def __init__(self, folder: Path) -> None:
        # a short path: unix socket names are limited to about 100 bytes
        self.path = Path("/tmp") / f"vbd-trap-{uuid.uuid4().hex[:8]}.sock"
        self.connections = 0
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(str(self.path))
        self._server.listen(16)
        self._server.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"nbd+unix:///export?socket={self.path}"

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            client.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._server.close()
        self.path.unlink(missing_ok=True)


@pytest.fixture
def trap(tmp_path: Path) -> Iterator[NbdTrap]:
    listener = NbdTrap(tmp_path)
    yield listener
    listener.close()


def forged_header(path: Path, backing: str, backing_format: str | None = "raw") -> Path:
    """A file whose first bytes are a qcow2 header naming ``backing``: what a guest can write
    at the start of its raw disk."""
    command = ["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", backing]
    command += ["-F", backing_format or "raw", str(path), "64M"]
    run(*command)
    if backing_format is None:
        unrecord_backing_format(path)
    return path


def header_fields(path: Path) -> tuple[int, int]:
    """(backing_file_offset, backing_file_size) of a qcow2 header."""
    with path.open("rb") as stream:
        data = stream.read(20)
    offset, size = struct.unpack(">QI", data[8:20])
    return offset, size


def patch_backing_name(path: Path, name: bytes, *, size: int | None = None) -> None:
    """Overwrite the recorded backing name (and its length field) in place."""
    offset, _ = header_fields(path)
    with path.open("r+b") as stream:
        stream.seek(offset)
        stream.write(name)
        stream.seek(16)
        stream.write(struct.pack(">I", len(name) if size is None else size))


def patch_u64(path: Path, at: int, value: int) -> None:
    with path.open("r+b") as stream:
        stream.seek(at)
        stream.write(struct.pack(">Q", value))


def unrecord_backing_format(path: Path) -> None:
    """Turn the backing-format header extension into one QEMU does not know (and skips)."""
    data = bytearray(path.read_bytes()[:65536])
    at = data.find(struct.pack(">I", 0xE2792ACA))
    assert at > 0, "no backing format extension"
    with path.open("r+b") as stream:
        stream.seek(at)
        stream.write(struct.pack(">I", 0x0BADF00D))


def overlay_of(path: Path, backing: Path) -> Path:
    return create(path, backing=backing)


def assert_refused(result: subprocess.CompletedProcess[str], image: Path, why: str) -> None:
    """Exit 1 and one line on stderr that names the image and says why."""
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert str(image) in lines[0] and why in lines[0], lines[0]


def chain(tmp_path: Path) -> ChainBuilder:
    """base (cp1) <- s1 (cp1, cp2) <- active (cp1, cp2, cp3), known writes in each."""
    return build(tmp_path / "images")


# ------------------------------------------------------------------ a raw disk's forged header


@pytest.mark.parametrize("running", [False, True], ids=["shut-off", "running"])
def test_raw_disk_with_a_forged_header_naming_an_nbd_socket_is_never_opened(
    tmp_path: Path, domains: Domains, daemon_factory: Any, trap: NbdTrap, running: bool
) -> None:
    """Cases 1-2: a guest wrote a qcow2 header naming an NBD socket into its raw disk."""
    (tmp_path / "images").mkdir()
    disk = forged_header(tmp_path / "images" / "guest.img", trap.url)
    before = digest(disk)
    dom = domains.define(disk, start=running, fmt="raw")
    daemon = daemon_factory(rescan_interval=1).start()
    entry = daemon.wait_for(is_for(dom, "disk_skipped"), what="raw disk skipped")
    assert "raw disk holds no checkpoints" in entry["reason"], entry
    daemon.signal(signal.SIGHUP)
    daemon.wait_event("rescan_requested")
    time.sleep(3)  # several rescans (every second)
    skips = [e for e in daemon.entries() if is_for(dom, "disk_skipped")(e)]
    assert len(skips) == 1, skips  # reported once, not on every rescan
    assert trap.connections == 0
    if running:
        stop_gracefully(dom)
    assert digest(disk) == before


@pytest.mark.parametrize("command", ["inspect", "reconcile"])
def test_commands_open_top_as_qcow2_and_refuse_a_protocol_backing(
    tmp_path: Path, trap: NbdTrap, command: str
) -> None:
    """Cases 3-4: `inspect` / `reconcile` on a raw file with a forged header."""
    top = forged_header(tmp_path / "guest.img", trap.url)
    other = create(tmp_path / "other.qcow2")
    before = digest(top, other)
    args = [str(top)] if command == "inspect" else ["--top", str(top), "--base", str(other)]
    assert_refused(cli(command, *args), top, "not a plain file")
    assert trap.connections == 0
    assert digest(top, other) == before


def test_a_json_pseudo_filename_backing_is_refused(tmp_path: Path, trap: NbdTrap) -> None:
    """Case 5: json:{...} names any driver QEMU has; it is never handed to QEMU."""
    name = json.dumps({"driver": "nbd", "server": {"type": "unix", "path": str(trap.path)}})
    top = forged_header(tmp_path / "guest.img", "json:" + name)
    before = digest(top)
    assert_refused(cli("inspect", str(top)), top, "not a plain file")
    assert trap.connections == 0 and digest(top) == before


# ------------------------------------------------------------------ malformed chains


def malformed(tmp_path: Path, how: str) -> tuple[Path, Path, str]:  # noqa: PLR0911, PLR0912 - one case a branch
    """A chain top made hostile in one way; (top, the image the error must name, why)."""
    base = create(tmp_path / "base.qcow2")
    top = overlay_of(tmp_path / "top.qcow2", base)
    add_bitmap(top, "cp1")
    if how == "nul-in-backing-name":
        patch_backing_name(top, str(base).encode()[:-2] + b"\0w")
        return top, top, "NUL byte"
    if how == "oversized-backing-name":
        patch_backing_name(top, str(base).encode(), size=4000)
        return top, top, "length 4000"
    if how == "non-utf8-backing-name":
        patch_backing_name(top, str(base).encode()[:-4] + b"\xff\xfe\xfd\xfc")
        return top, top, "not UTF-8"
    if how == "backing-name-past-the-end":
        patch_u64(top, 8, 1 << 40)
        return top, top, "past the first cluster"
    if how == "truncated-qcow2":
        os.truncate(top, 40)
        return top, top, "too short"
    if how == "backing-loop":
        run("qemu-img", "rebase", "-q", "-u", "-b", str(top), "-F", "qcow2", str(base))
        return top, top, "backing loop"
    if how == "self-loop":
        run("qemu-img", "rebase", "-q", "-u", "-b", str(top), "-F", "qcow2", str(top))
        return top, top, "backing loop"
    if how == "missing-backing-file":
        base.unlink()
        return top, base, "No such file"
    if how == "backing-format-not-recorded":
        unrecord_backing_format(top)
        return top, top, "not recorded"
    if how == "unknown-incompatible-feature":
        patch_u64(top, 72, 1 << 40)
        return top, top, "unknown incompatible features"
    if how == "marked-corrupt":
        patch_u64(top, 72, 1 << 1)
        return top, top, "marked corrupt"
    if how == "external-data-file":
        data = tmp_path / "data.raw"
        data.write_bytes(b"\0" * 65536)
        os.truncate(data, 64 << 20)
        odd = tmp_path / "odd.qcow2"
        run("qemu-img", "create", "-q", "-f", "qcow2", "-o", f"data_file={data}", str(odd), "64M")
        return odd, odd, "external data file"
    if how == "fifo-as-layer":
        fifo = tmp_path / "fifo.qcow2"
        os.mkfifo(fifo)
        run("qemu-img", "rebase", "-q", "-u", "-b", str(fifo), "-F", "qcow2", str(top))
        return top, fifo, "not a regular file"
    raise AssertionError(how)


MALFORMED = [
    "nul-in-backing-name",
    "oversized-backing-name",
    "non-utf8-backing-name",
    "backing-name-past-the-end",
    "truncated-qcow2",
    "backing-loop",
    "self-loop",
    "missing-backing-file",
    "backing-format-not-recorded",
    "unknown-incompatible-feature",
    "marked-corrupt",
    "external-data-file",
    "fifo-as-layer",
]


@pytest.mark.parametrize("how", MALFORMED)
def test_a_malformed_chain_is_refused_naming_the_image(tmp_path: Path, how: str) -> None:
    """Cases 6-18: inspect and reconcile both refuse, with one line naming the image."""
    top, named, why = malformed(tmp_path, how)
    files = sorted(p for p in tmp_path.iterdir() if p.is_file())
    before = digest(*files)
    assert_refused(cli("inspect", str(top)), named, why)
    base = tmp_path / "base.qcow2"
    assert_refused(cli("reconcile", "--top", str(top), "--base", str(base)), named, why)
    assert digest(*files) == before


# ------------------------------------------------------------------ storage roots


def test_a_symlinked_folder_leading_out_of_the_root_is_refused(tmp_path: Path) -> None:
    """Case 19: root/link -> outside; the base through the link is outside the root."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    c = build(outside)
    run("qemu-img", "commit", "-q", "-d", "-b", str(c.layers[0]), str(c.layers[1]))
    (root / "link").symlink_to(outside)
    base, s1 = root / "link" / "base.qcow2", root / "link" / "s1.qcow2"
    before = digest(*c.layers)
    result = cli("reconcile", "--top", str(s1), "--base", str(base), "--storage-root", str(root))
    assert_refused(result, c.layers[0], "outside the storage roots")
    assert digest(*c.layers) == before


def test_dotdot_leading_out_of_the_root_is_refused(tmp_path: Path) -> None:
    """Case 20: root/../outside/base.qcow2 is not under root."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    c = build(outside)
    run("qemu-img", "commit", "-q", "-d", "-b", str(c.layers[0]), str(c.layers[1]))
    before = digest(*c.layers)
    base = root / ".." / "outside" / "base.qcow2"
    result = cli(
        "reconcile", "--top", str(c.layers[1]), "--base", str(base), "--storage-root", str(root)
    )
    assert_refused(result, c.layers[0], "outside the storage roots")
    assert digest(*c.layers) == before


@pytest.mark.parametrize("root", ["/", "//", "/var/..", "link-to-slash"])
def test_the_whole_file_system_is_refused_as_a_storage_root(tmp_path: Path, root: str) -> None:
    """Cases 21-24: check-config and --storage-root refuse '/' however it is spelt."""
    if root == "link-to-slash":
        (tmp_path / "slash").symlink_to("/")
        root = str(tmp_path / "slash")
    config = tmp_path / "config.toml"
    config.write_text(f"[storage]\nroots = [{json.dumps(root)}]\n")
    result = cli("check-config", str(config))
    assert result.returncode == 2 and "whole file system" in result.stderr, result.stderr
    assert f"{config}:storage.roots:" in result.stderr
    flag = cli("reconcile", "--top", "/x", "--base", "/y", "--storage-root", root)
    assert flag.returncode == 2 and "--storage-root:" in flag.stderr, flag.stderr


# ------------------------------------------------------------------ odd but valid bitmaps


def committed_chain(tmp_path: Path, names: list[str], granularity: int = K64) -> ChainBuilder:
    c = ChainBuilder(tmp_path)
    c.start()
    for name in names:
        c.checkpoint(name, granularity)
    c.write(0, K64)
    c.snapshot("s1.qcow2")
    c.write(5 * MiB, K64, 0xBB)
    run("qemu-img", "commit", "-q", "-d", "-b", str(c.layers[0]), str(c.layers[1]))
    return c


@pytest.mark.parametrize(
    "name",
    ["cp\x01\x1b[31mred\x7f", "c" * 1023],
    ids=["control-characters", "1023-byte-name"],
)
def test_odd_bitmap_names_are_carried_with_every_bit(tmp_path: Path, name: str) -> None:
    """Cases 25-26: names with control characters, and at QEMU's 1023-byte limit."""
    c = committed_chain(tmp_path, [name])
    run("qemu-img", "bitmap", "--remove", str(c.layers[0]), name)  # only s1 holds it now
    result = cli("reconcile", "--top", str(c.layers[1]), "--base", str(c.layers[0]), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["result"] == "reconciled"
    assert dirty_extents(c.layers[0], name) == expected([(5 * MiB, K64)])
    shown = cli("inspect", str(c.layers[0]))
    assert shown.returncode == 0 and "\x1b" not in shown.stdout  # escaped, never raw


def test_an_image_with_hundreds_of_bitmaps(tmp_path: Path) -> None:
    """Case 27: 200 checkpoints, all carried in one transaction."""
    names = [f"cp{i:03d}" for i in range(200)]
    base = create(tmp_path / "base.qcow2")
    top = overlay_of(tmp_path / "top.qcow2", base)
    script = "\n".join(
        json.dumps(
            {
                "execute": "block-dirty-bitmap-add",
                "arguments": {"node": "top", "name": name, "persistent": True},
            }
        )
        for name in names
    )
    qmp = [json.dumps({"execute": "qmp_capabilities"})]
    qmp.append(
        json.dumps(
            {
                "execute": "blockdev-add",
                "arguments": {
                    "driver": "qcow2",
                    "node-name": "top",
                    "backing": None,
                    "file": {"driver": "file", "filename": str(top)},
                },
            }
        )
    )
    qmp.append(script)
    qmp.append(json.dumps({"execute": "blockdev-del", "arguments": {"node-name": "top"}}))
    qmp.append(json.dumps({"execute": "quit"}))
    subprocess.run(
        ["qemu-storage-daemon", "--chardev", "stdio,id=m", "--monitor", "chardev=m"],
        input="\n".join(qmp) + "\n",
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    write(top, 3 * MiB, K64)
    run("qemu-img", "commit", "-q", "-d", "-b", str(base), str(top))
    result = cli("reconcile", "--top", str(top), "--base", str(base), "--json")
    assert result.returncode == 0, result.stderr
    assert bitmap_names(base) == set(names)
    assert dirty_extents(base, "cp199") == expected([(3 * MiB, K64)])


# ------------------------------------------------------------------ permissions and space


def test_an_image_owned_by_another_user_is_named_not_changed(tmp_path: Path) -> None:
    """Case 28: without capabilities (as the systemd unit runs it), root cannot read a 0600
    image of another user: a clear error, nothing changed."""
    c = committed_chain(tmp_path, ["cp1"])
    base = c.layers[0]
    os.chown(base, 65534, 65534)
    os.chmod(base, 0o600)
    os.chmod(tmp_path, 0o755)
    before = digest(*c.layers)
    no_capabilities = ("setpriv", "--inh-caps=-all", "--bounding-set=-all", "--")
    result = cli(
        "reconcile", "--top", str(c.layers[1]), "--base", str(base), prefix=no_capabilities
    )
    assert_refused(result, base, "Permission denied")
    assert digest(*c.layers) == before


@pytest.fixture
def small_filesystem(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_file_system_is_refused_before_the_base_is_opened(
    small_filesystem: Path,
) -> None:
    """Case 29: QEMU would fail to store the bitmaps on close and leave them all in-use."""
    c = committed_chain(small_filesystem, ["cp1", "cp2"])
    run("qemu-img", "bitmap", "--remove", str(c.layers[0]), "cp2")
    free = os.statvfs(small_filesystem)
    filler = small_filesystem / "filler"
    filler.write_bytes(b"\xff" * (free.f_bavail * free.f_frsize - 8192))
    before = digest(*c.layers)
    result = cli("reconcile", "--top", str(c.layers[1]), "--base", str(c.layers[0]))
    assert_refused(result, c.layers[0], "bytes free")
    assert digest(*c.layers) == before
    filler.unlink()


# ------------------------------------------------------------------ hostile files beside a merge


def stray(folder: Path, kind: str, active: Path, trap: NbdTrap, domains: Domains) -> Path:
    """A file beside the chain, changed after the daemon's last look, claiming to be made on
    the committed top in one hostile way."""
    path = folder / f"stray-{kind}.qcow2"
    if kind == "raw-disk-of-another-domain":
        forged_header(path, str(active), "qcow2")
        domains.define(path, fmt="raw")
    elif kind == "backing-format-not-recorded":
        forged_header(path, str(active), None)
    elif kind == "nul-in-backing-name":
        forged_header(path, str(active), "qcow2")
        patch_backing_name(path, str(active).encode() + b"\0")
    elif kind == "oversized-backing-name":
        forged_header(path, str(active), "qcow2")
        patch_backing_name(path, str(active).encode(), size=2000)
    elif kind == "non-utf8-backing-name":
        forged_header(path, str(active), "qcow2")
        patch_backing_name(path, str(active).encode()[:-1] + b"\xff")
    elif kind == "backing-name-past-the-end":
        forged_header(path, str(active), "qcow2")
        patch_u64(path, 8, 1 << 40)
    elif kind == "truncated-qcow2":
        forged_header(path, str(active), "qcow2")
        os.truncate(path, 48)
    elif kind == "nbd-backing":
        forged_header(path, trap.url, "qcow2")
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "symlink-out-of-the-roots":
        outside = folder.parent.parent / "outside"
        outside.mkdir(exist_ok=True)
        overlay_of(outside / "elsewhere.qcow2", active)
        path.symlink_to(outside / "elsewhere.qcow2")
    else:
        raise AssertionError(kind)
    return path


STRAYS = [
    "raw-disk-of-another-domain",
    "backing-format-not-recorded",
    "nul-in-backing-name",
    "oversized-backing-name",
    "non-utf8-backing-name",
    "backing-name-past-the-end",
    "truncated-qcow2",
    "nbd-backing",
    "fifo",
    "symlink-out-of-the-roots",
]


@pytest.mark.parametrize("kind", STRAYS)
def test_a_cold_merge_beside_a_hostile_file_is_reconciled_with_every_bit(
    tmp_path: Path, domains: Domains, daemon_factory: Any, trap: NbdTrap, kind: str
) -> None:
    """Cases 30-39: the daemon knows base <- s1 <- active; oVirt's cold merge of the active
    layer into s1 happens beside a hostile file that claims active as its backing."""
    c = chain(tmp_path)
    dom = domains.define(c.active)
    daemon = daemon_factory(roots=[tmp_path / "images"]).start()
    daemon.wait_for(is_for(dom, "disk_tracked"), what="disk tracked")
    _, s1, active = c.layers
    hostile = stray(c.folder, kind, active, trap, domains)
    hostile_before = digest(hostile) if hostile.is_file() and not hostile.is_symlink() else {}
    run("qemu-img", "commit", "-q", "-b", str(s1), str(active))
    dom = domains.conn.defineXML(dom.XMLDesc(0).replace(f"file='{active}'", f"file='{s1}'"))
    daemon.signal(signal.SIGHUP)
    entry = daemon.wait_for(is_for(dom, "reconciliation"), what="reconciliation")
    assert entry["result"] == "reconciled", entry
    assert entry["removed"] == [str(active)] and entry["base"] == str(s1), entry
    assert dirty_extents(s1, "cp2") == expected(EVERYTHING[1:])
    assert dirty_extents(s1, "cp3") == expected(EVERYTHING[2:])
    assert trap.connections == 0
    if hostile_before:
        assert digest(hostile) == hostile_before


def test_an_overlay_without_the_tops_bitmaps_is_never_reported_fine(
    tmp_path: Path, domains: Domains, daemon_factory: Any
) -> None:
    """Case 40: a well-formed qcow2 overlay of the committed top that lacks its checkpoints
    (made without them, or planted): which bits the base needs cannot be told, so no bit is
    merged and the bitmaps are reported untrusted (and filled: every bit set, nothing guessed)."""
    c = chain(tmp_path)
    dom = domains.define(c.active)
    daemon = daemon_factory(roots=[tmp_path / "images"]).start()
    daemon.wait_for(is_for(dom, "disk_tracked"), what="disk tracked")
    _, s1, active = c.layers
    planted = overlay_of(c.folder / "planted.qcow2", active)
    run("qemu-img", "commit", "-q", "-b", str(s1), str(active))
    before, planted_before = state(s1), digest(planted)  # before the redefinition: a look
    dom = domains.conn.defineXML(dom.XMLDesc(0).replace(f"file='{active}'", f"file='{s1}'"))
    daemon.signal(signal.SIGHUP)
    entry = daemon.wait_for(is_for(dom, "reconciliation"), what="reconciliation")
    assert entry["result"] == "unrecoverable", entry
    assert str(planted) in entry["error"] and "lacks" in entry["error"]
    assert sorted(entry["untrusted"]) == ["cp1", "cp2", "cp3"]
    made_complete = daemon.wait_for(is_for(dom, "checkpoint_filled"), what="the fill")
    assert state(s1) == filled(before, made_complete["bitmaps"], virtual_size(s1))
    assert digest(planted) == planted_before


# ------------------------------------------------------------------ the daemon's own files


@pytest.mark.parametrize(
    "document",
    [
        "[]",
        '{"name": "x", "chains": "not a mapping"}',
        '{"name": "x", "chains": {"vda": [1, 2]}}',
        '{"name": "x", "chains": {}, "bitmaps": {"vda": {"/i": [{"name": "a", "granularity": 3,'
        ' "recording": true}]}}}',
        '{"version": 99, "name": "x", "chains": {}}',
        "\xff\xfe not json",
    ],
    ids=["list", "chains-string", "chain-of-numbers", "bad-granularity", "future", "bytes"],
)
def test_a_state_file_of_the_wrong_shape_is_quarantined(
    tmp_path: Path, domains: Domains, daemon_factory: Any, document: str
) -> None:
    """Cases 41-46: the disk is tracked afresh; the file is set aside, logged and counted."""
    c = chain(tmp_path)
    dom = domains.define(c.active)
    daemon = daemon_factory(roots=[tmp_path / "images"])
    state = daemon.state_dir / "domains" / f"{dom.UUIDString()}.json"
    state.parent.mkdir(parents=True)
    state.write_bytes(document.encode("utf-8", errors="surrogateescape"))
    daemon.start()
    entry = daemon.wait_event("state_quarantined")
    assert entry["path"] == str(state) + ".corrupt" and Path(entry["path"]).exists()
    daemon.wait_for(is_for(dom, "disk_tracked"), what="disk tracked afresh")
    assert json.loads(state.read_text())["chains"]["vda"]


def test_no_leftover_of_ours_outlives_a_restart(
    tmp_path: Path, domains: Domains, daemon_factory: Any
) -> None:
    """Case 47: a node and a probe bitmap under our prefix, as a crash half-way leaves them,
    are removed when the daemon connects; libvirt's own nodes and bitmaps are untouched."""
    c = chain(tmp_path)
    dom = domains.define(c.active, start=True)
    spare = create(tmp_path / "images" / "spare.qcow2")

    def qmp(command: dict[str, Any]) -> Any:
        out = run(
            "virsh", "-c", "qemu:///system", "qemu-monitor-command", dom.name(), json.dumps(command)
        )
        return json.loads(out)["return"]

    qmp(
        {
            "execute": "blockdev-add",
            "arguments": {
                "driver": "qcow2",
                "node-name": "vbd-src-0-dead01",
                "read-only": True,
                "backing": None,
                "file": {"driver": "file", "filename": str(spare), "read-only": True},
            },
        }
    )
    nodes = qmp({"execute": "query-named-block-nodes", "arguments": {"flat": True}})
    base_node = next(
        n["node-name"]
        for n in nodes
        if n["node-name"].endswith("-format")
        and n["node-name"].startswith("libvirt-")
        and n["node-name"] != "vbd-src-0-dead01"
    )
    qmp(
        {
            "execute": "block-dirty-bitmap-add",
            "arguments": {"node": base_node, "name": "vbd-probe-dead02", "persistent": False},
        }
    )
    daemon = daemon_factory(roots=[tmp_path / "images"]).start()
    entry = daemon.wait_event("leftovers_removed", domain=dom.name())
    assert entry["nodes"] == ["vbd-src-0-dead01"]
    assert entry["bitmaps"] == [f"{base_node}/vbd-probe-dead02"]
    nodes = qmp({"execute": "query-named-block-nodes", "arguments": {"flat": True}})
    assert not [n for n in nodes if n["node-name"].startswith("vbd-")]
    names = {b["name"] for n in nodes for b in n.get("dirty-bitmaps", [])}
    assert not [name for name in names if name.startswith("vbd-")] and "cp3" in names
    stop_gracefully(dom)
