"""The caller's input path (qrexec-client and qrexec-client-vm): small input is read by
hand, bulk input from a pipe is spliced into the vchan socket once a read fills a frame,
and either way the service side receives exactly the bytes, framed at most one chunk
each, then one STDIN EOF.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from qrexec.backends.socket import SocketBackend, SocketStream
from qrexec.client.caller import CallerIO, run_caller
from qrexec.protocol.constants import HEADER_SIZE, MAX_DATA_CHUNK_V3, PROTOCOL_V3, MsgType
from qrexec.protocol.messages import HEADER, Data, ExitStatus, encode

pytestmark = pytest.mark.timeout(60)


def _pair(folder: Path) -> tuple[SocketStream, SocketStream]:
    listener = SocketBackend(1, folder).listen(2, 600)
    results: list[SocketStream] = []
    connect = threading.Thread(
        target=lambda: results.append(SocketBackend(2, folder).connect(1, 600))
    )
    connect.start()
    ours = listener.accept(timeout=10)
    connect.join(10)
    return ours, results[0]


def _service_side(stream: SocketStream, got: dict[str, Any]) -> None:
    """Read STDIN frames to their EOF (hashing them), then answer with an exit code."""
    digest, total, largest, frames = hashlib.sha256(), 0, 0, 0
    buffer = b""
    while True:
        while len(buffer) < HEADER_SIZE:
            buffer += stream.recv(1 << 18)
        kind, length = HEADER.unpack_from(buffer)
        assert kind == MsgType.DATA_STDIN
        while len(buffer) < HEADER_SIZE + length:
            buffer += stream.recv(1 << 18)
        payload, buffer = buffer[HEADER_SIZE : HEADER_SIZE + length], buffer[HEADER_SIZE + length :]
        if not length:
            break
        digest.update(payload)
        total += length
        largest = max(largest, length)
        frames += 1
    got.update(total=total, sha=digest.hexdigest(), largest=largest, frames=frames)
    stream.send(encode(Data(MsgType.DATA_STDOUT, b"")) + encode(Data(MsgType.DATA_STDERR, b"")))
    stream.send(encode(ExitStatus(0)))


def _run(
    tmp_path: Path, data: bytes, monkeypatch: pytest.MonkeyPatch
) -> tuple[dict[str, Any], int]:
    caller, service = _pair(tmp_path)
    spliced: list[int] = []
    real = caller.splice_from

    def counting(header: bytes | bytearray | memoryview, fd: int, count: int) -> None:
        spliced.append(count)
        real(header, fd, count)

    monkeypatch.setattr(caller, "splice_from", counting)
    read_end, write_end = os.pipe()
    writer = threading.Thread(target=lambda: (os.write(write_end, data), os.close(write_end)))
    got: dict[str, Any] = {}
    answer = threading.Thread(target=_service_side, args=(service, got))
    writer.start()
    answer.start()
    out = os.open(os.devnull, os.O_WRONLY)
    try:
        code = run_caller(
            caller, PROTOCOL_V3, CallerIO(read_end, out, out, close_stdout_at_eof=False)
        )
        answer.join(30)
        writer.join(30)
    finally:
        os.close(out)
        os.close(read_end)
        caller.close()
        service.close()
    assert code == 0
    assert got["total"] == len(data) and got["sha"] == hashlib.sha256(data).hexdigest()
    assert got["largest"] <= MAX_DATA_CHUNK_V3
    return got, sum(spliced)


def test_small_input_is_read_by_hand_not_spliced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    got, spliced = _run(tmp_path, b"a few bytes\n", monkeypatch)
    assert (got["frames"], spliced) == (1, 0)


def test_bulk_input_from_a_pipe_is_spliced_after_the_first_full_frame(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = os.urandom(5 * (1 << 20) + 12345)  # odd size: the last frame is short
    _, spliced = _run(tmp_path, data, monkeypatch)
    # At most the first read (four frames' worth) went through user space.
    assert len(data) - 4 * MAX_DATA_CHUNK_V3 <= spliced < len(data)


def test_bulk_input_without_splice_goes_by_hand(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delattr(os, "splice")
    data = os.urandom(3 * (1 << 20) + 7)
    _, spliced = _run(tmp_path, data, monkeypatch)
    assert spliced == 0
