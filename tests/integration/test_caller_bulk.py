"""The caller's bulk paths (qrexec-client and qrexec-client-vm).

Input: small input is read by hand, bulk input from a pipe is spliced into the vchan
socket once a read fills a frame, and either way the service side receives exactly the
bytes, framed at most one chunk each, then one STDIN EOF.

Output: once a frame of the largest size arrives, the rest of the stream goes frame by
frame with payloads spliced to the outputs; bytes arrive exact, only whole frames are
delivered, and an output that cannot take a splice (a file here, a terminal for users)
still gets its bytes.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from qrexec.backends.socket import SocketBackend, SocketStream
from qrexec.client.caller import CLOSED_EARLY_EXIT, CallerIO, run_caller
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
        # A frame built in the caller's own pipe comes with its header (and no header apart).
        spliced.append(count if header else count - HEADER_SIZE)
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


def _serve_output(stream: SocketStream, frames: list[bytes], cut: int | None = None) -> None:
    """Drain the caller's STDIN, send ``frames`` (cut after ``cut`` bytes if given)."""
    data = b"".join(frames)
    if cut is not None:
        data = data[:cut]
    stream.send(data)
    if cut is not None:
        stream.close()


def _output_frames(stdout: bytes, stderr: bytes, code: int | None) -> list[bytes]:
    frames = [
        encode(Data(kind, data[i : i + MAX_DATA_CHUNK_V3]))
        for kind, data in ((MsgType.DATA_STDOUT, stdout), (MsgType.DATA_STDERR, stderr))
        for i in range(0, len(data), MAX_DATA_CHUNK_V3)
    ]
    frames += [encode(Data(MsgType.DATA_STDOUT, b"")), encode(Data(MsgType.DATA_STDERR, b""))]
    if code is not None:
        frames.append(encode(ExitStatus(code)))
    return frames


def _run_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, frames: list[bytes], cut: int | None = None
) -> tuple[int, bytes, bytes, int]:
    caller, service = _pair(tmp_path)
    spliced: list[int] = []
    real = caller.splice_into

    def counting(fd: int, count: int) -> int:
        moved = real(fd, count)
        spliced.append(moved)
        return moved

    monkeypatch.setattr(caller, "splice_into", counting)
    out_read, out_write = os.pipe()
    err_path = tmp_path / "stderr"
    err = os.open(err_path, os.O_WRONLY | os.O_CREAT, 0o600)  # a file: not spliced to
    got = bytearray()
    reader = threading.Thread(target=lambda: _read_all(out_read, got))
    reader.start()
    sender = threading.Thread(target=_serve_output, args=(service, frames, cut))
    sender.start()
    try:
        code = run_caller(caller, PROTOCOL_V3, CallerIO(None, out_write, err))
        sender.join(30)
        if cut is not None:  # no STDOUT EOF came, so run_caller left stdout open
            os.close(out_write)
        reader.join(30)
    finally:
        os.close(err)
        os.close(out_read)
        caller.close()
        service.close()
    return code, bytes(got), err_path.read_bytes(), sum(spliced)


def _read_all(fd: int, into: bytearray) -> None:
    while chunk := os.read(fd, 1 << 20):
        into += chunk


def test_bulk_output_is_spliced_exactly_and_a_file_output_still_gets_its_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stdout = os.urandom(6 * (1 << 20) + 333)
    stderr = os.urandom(3 * MAX_DATA_CHUNK_V3 + 5)
    code, out, err, spliced = _run_output(tmp_path, monkeypatch, _output_frames(stdout, stderr, 3))
    assert code == 3
    assert hashlib.sha256(out).digest() == hashlib.sha256(stdout).digest()
    assert err == stderr
    # Everything after the first full frame (and the rest of its buffer) was spliced.
    assert len(stdout) - (1 << 20) <= spliced <= len(stdout) + len(stderr)


def test_a_stream_cut_inside_a_frame_on_the_spliced_path_delivers_no_part_of_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stdout = os.urandom(4 * (1 << 20))
    frames = _output_frames(stdout, b"", 0)
    whole = 40  # frames, well past the switch to splicing
    cut = sum(map(len, frames[:whole])) + HEADER_SIZE + 1000
    code, out, _, spliced = _run_output(tmp_path, monkeypatch, frames, cut)
    assert code == CLOSED_EARLY_EXIT
    assert out == stdout[: whole * MAX_DATA_CHUNK_V3]  # whole frames only
    assert spliced > 0


def test_a_frame_sent_byte_by_byte_after_the_switch_comes_through_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from qrexec.client import caller as caller_module

    copied: list[int] = []
    real = caller_module._SplicedOutput._deliver_copied

    def counting(self: object, kind: MsgType, pipe_fd: int, moved: int, length: int) -> None:
        copied.append(length)
        real(self, kind, pipe_fd, moved, length)  # type: ignore[arg-type]

    monkeypatch.setattr(caller_module._SplicedOutput, "_deliver_copied", counting)
    caller, service = _pair(tmp_path)
    first, slow = os.urandom(MAX_DATA_CHUNK_V3), os.urandom(5000)

    def serve() -> None:
        service.send(encode(Data(MsgType.DATA_STDOUT, first)))  # full size: splicing starts
        service.send(HEADER.pack(MsgType.DATA_STDOUT, len(slow)))
        for byte in slow:  # one skb each: the pipe runs out of slots long before bytes
            service.send(bytes([byte]))
        service.send(b"".join(_output_frames(b"", b"", 9)))

    out_read, out_write = os.pipe()
    got = bytearray()
    reader = threading.Thread(target=lambda: _read_all(out_read, got))
    sender = threading.Thread(target=serve)
    reader.start()
    sender.start()
    err = os.open(os.devnull, os.O_WRONLY)
    try:
        code = run_caller(caller, PROTOCOL_V3, CallerIO(None, out_write, err))
        sender.join(30)
        reader.join(30)
    finally:
        os.close(err)
        os.close(out_read)
        caller.close()
        service.close()
    assert (code, bytes(got)) == (9, first + slow)
    assert copied == [len(slow)]  # that frame, and only it, went through memory
