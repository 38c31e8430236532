"""The engine's attach stream as compose_project.exec reads it (no engine needed)."""

from __future__ import annotations

import socket
import threading

import pytest

from qrexec.sim.compose_project import read_attach_stream
from qrexec.sim.engine import EngineError


def _read(raw: bytes) -> tuple[bytes, bytes]:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        writer = threading.Thread(target=lambda: (theirs.sendall(raw), theirs.close()))
        writer.start()
        try:
            return read_attach_stream(ours)
        finally:
            writer.join()


def test_frames_are_split_into_stdout_and_stderr() -> None:
    raw = bytes.fromhex(
        "01000000 00000003 6f7574"  # stdout "out"
        "02000000 00000004 6572720a"  # stderr "err\n"
        "01000000 00000000"  # an empty stdout frame
        "01000000 00000002 2121"  # stdout "!!"
    )
    assert _read(raw) == (b"out!!", b"err\n")


def test_large_frames_and_an_empty_stream() -> None:
    big = bytes(range(256)) * 8192  # 2 MiB
    raw = b"\x02\0\0\0" + len(big).to_bytes(4, "big") + big
    assert _read(raw) == (b"", big)
    assert _read(b"") == (b"", b"")


@pytest.mark.parametrize("raw", ["0100", "01000000 00000005 6162"])
def test_a_stream_cut_inside_a_frame_is_an_error(raw: str) -> None:
    with pytest.raises(EngineError, match="inside a frame"):
        _read(bytes.fromhex(raw))
