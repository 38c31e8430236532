"""qubes.Filecopy: a tree round-trips with names, sizes, modes and times; hostile streams fail."""

from __future__ import annotations

import io
import os
import struct
import threading
from pathlib import Path

import pytest

from qrexec.sim import filecopy
from qrexec.sim.filecopy import HEADER, CopyError, receive, send


def _pipe_copy(
    paths: list[str], home: Path, source: str = "vm1"
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Run sender and receiver connected by two pipes, as qrexec would connect them."""
    to_receiver_r, to_receiver_w = os.pipe()
    to_sender_r, to_sender_w = os.pipe()
    result: dict[str, object] = {}

    def run_receiver() -> None:
        with os.fdopen(to_receiver_r, "rb") as inp, os.fdopen(to_sender_w, "wb") as out:
            try:
                result["receiver"] = receive(source, home, inp, out)
            except CopyError as exc:
                result["receiver"] = exc

    thread = threading.Thread(target=run_receiver)
    thread.start()
    with os.fdopen(to_receiver_w, "wb") as out, os.fdopen(to_sender_r, "rb") as answer:
        sent = send(paths, out, answer)
    thread.join(10)
    received = result["receiver"]
    assert isinstance(received, tuple), received
    return sent, received


def test_tree_round_trip_preserves_names_sizes_modes_times(tmp_path: Path) -> None:
    src = tmp_path / "src" / "tree"
    (src / "sub" / "empty").mkdir(parents=True)
    (src / "a.txt").write_text("hello\n")
    (src / "sub" / "big.bin").write_bytes(os.urandom(300_000))
    (src / "sub" / "script").write_text("#!/bin/sh\n")
    os.chmod(src / "a.txt", 0o600)
    os.chmod(src / "sub" / "script", 0o751)
    os.chmod(src / "sub", 0o750)
    os.utime(src / "a.txt", ns=(1_600_000_000_123_456_789, 1_600_000_000_987_654_321))
    home = tmp_path / "home"
    sent, received = _pipe_copy([str(src)], home)
    assert sent == received == (3, 6 + 300_000 + 10)
    dest = home / "QubesIncoming" / "vm1" / "tree"
    for original in [src, *src.rglob("*")]:
        copy = dest / original.relative_to(src)
        assert copy.exists(), copy
        assert copy.stat().st_mode == original.stat().st_mode
        if original.is_file():
            assert copy.read_bytes() == original.read_bytes()
    assert (dest / "a.txt").stat().st_mtime_ns == 1_600_000_000_987_654_321


def _stream(*entries: tuple[bytes, int, bytes]) -> bytes:
    data = b""
    for name, mode, content in entries:
        data += HEADER.pack(len(name), mode, 0, 0, 0, 0, len(content)) + name + content
    return data + HEADER.pack(0, 0, 0, 0, 0, 0, 0)


@pytest.mark.parametrize(
    ("stream", "message"),
    [
        (_stream((b"../evil\0", 0o100644, b"x")), "unsafe name"),
        (_stream((b"/etc/evil\0", 0o100644, b"x")), "unsafe name"),
        (_stream((b"a//b\0", 0o100644, b"x")), "unsafe name"),
        (_stream((b"noterm", 0o100644, b"x")), "NUL"),
        (_stream((b"a\0b\0", 0o100644, b"x")), "NUL"),
        (_stream((b"missing/f\0", 0o100644, b"x")), "cannot write"),
        (_stream((b"dev\0", 0o020644, b"")), "unsupported file type"),
        (_stream((b"d\0", 0o040755, b"content")), "directory 'd' with content"),
        (HEADER.pack(100_000, 0o100644, 0, 0, 0, 0, 0), "name length"),
        (HEADER.pack(4, 0o100644, 0, 0, 0, 0, 10) + b"abc\0" + b"short", "stream ended early"),
    ],
)
def test_hostile_streams_are_refused(tmp_path: Path, stream: bytes, message: str) -> None:
    out = io.BytesIO()
    with pytest.raises(CopyError, match=message):
        receive("vm1", tmp_path, io.BytesIO(stream), out)
    error, _pad, _crc = struct.unpack("<IIQ", out.getvalue())
    assert error != 0
    assert not (tmp_path.parent / "evil").exists()


def test_existing_file_is_not_overwritten_and_symlinks_are_not_followed(tmp_path: Path) -> None:
    base = tmp_path / "QubesIncoming" / "vm1"
    base.mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (base / "link").symlink_to(outside)
    with pytest.raises(CopyError, match="not a directory"):
        receive("vm1", tmp_path, io.BytesIO(_stream((b"link/f\0", 0o100644, b"x"))), io.BytesIO())
    assert not (outside / "f").exists()
    (base / "taken").write_text("mine")
    with pytest.raises(CopyError, match="cannot write"):
        receive("vm1", tmp_path, io.BytesIO(_stream((b"taken\0", 0o100644, b"x"))), io.BytesIO())
    assert (base / "taken").read_text() == "mine"


def test_bad_source_name_and_unsupported_sender_input(tmp_path: Path) -> None:
    with pytest.raises(CopyError, match="source domain"):
        receive("../x", tmp_path, io.BytesIO(_stream()), io.BytesIO())
    (tmp_path / "l").symlink_to("/etc")
    with pytest.raises(CopyError, match="only regular files"):
        send([str(tmp_path / "l")], io.BytesIO(), io.BytesIO())


def test_sender_notices_a_receiver_that_does_not_confirm(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(CopyError, match="did not confirm"):
        send([str(tmp_path / "f")], io.BytesIO(), io.BytesIO(b""))
    bad = struct.pack("<IIQ", 0, 0, 12345)
    with pytest.raises(CopyError, match="checksum mismatch"):
        send([str(tmp_path / "f")], io.BytesIO(), io.BytesIO(bad))
    assert filecopy.main(["send", str(tmp_path / "nonexistent")]) == 1
