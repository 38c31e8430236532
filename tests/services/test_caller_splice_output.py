"""The caller's output path (``qrexec.client.caller.run_caller``): STDOUT spliced socket ->
stdout pipe when it can be, copied otherwise (``os.splice`` taken away); the same bytes and
the same refusals either way.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import random
import socket
import threading
from collections.abc import Callable, Iterator

import pytest

from qrexec.backends.socket import SocketStream
from qrexec.client.caller import CLOSED_EARLY_EXIT, CallerIO, run_caller
from qrexec.protocol.constants import MsgType
from qrexec.protocol.messages import HEADER, Data, ExitStatus, encode
from qrexec.protocol.negotiation import max_data_chunk

VERSION = 3
CHUNK = max_data_chunk(VERSION)
SIZES = [1, 7, CHUNK, CHUNK - 1, 4095, 4097, 3, CHUNK, 65521, 12345, 2]

pytestmark = pytest.mark.timeout(120)


class SpliceSpy:
    def __init__(self, real: Callable[..., int]) -> None:
        self.real = real
        self.moved = 0

    def __call__(self, *args: object, **kwargs: object) -> int:
        count = self.real(*args, **kwargs)
        self.moved += bool(count)
        return count


@pytest.fixture(params=["splice", "no-splice", "einval"])
def mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    if request.param == "splice":
        if not hasattr(os, "splice"):
            pytest.fail("os.splice is missing on this Linux: the spliced path is untested")
        monkeypatch.setattr(os, "splice", SpliceSpy(os.splice))
        yield "splice"
        return
    if request.param == "einval":
        monkeypatch.setattr(os, "splice", _refuse)
    else:
        monkeypatch.delattr(os, "splice", raising=False)
    yield request.param


def _refuse(*args: object, **kwargs: object) -> int:
    """A kernel (or sandbox) that will not splice these files."""
    raise OSError(errno.EINVAL, "Invalid argument")


def run(wire: bytes) -> tuple[int, bytes, bytes]:
    """Feed ``wire`` as the service side; the exit code, stdout and stderr the caller wrote."""
    ours, theirs = socket.socketpair()
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    collected: dict[int, bytearray] = {out_r: bytearray(), err_r: bytearray()}

    def collect(fd: int) -> None:
        while data := os.read(fd, 1 << 16):
            collected[fd] += data

    def serve() -> None:
        theirs.sendall(wire)
        theirs.shutdown(socket.SHUT_WR)
        with contextlib.suppress(ConnectionResetError):
            while theirs.recv(1 << 16):  # the caller's STDIN EOF
                pass

    threads = [
        threading.Thread(target=t, args=a)
        for t, a in ((collect, (out_r,)), (collect, (err_r,)), (serve, ()))
    ]
    for thread in threads:
        thread.start()
    stream = SocketStream(ours, 0, 1)
    try:
        code = run_caller(
            stream, VERSION, CallerIO(stdin_fd=None, stdout_fd=out_w, stderr_fd=err_w)
        )
    finally:
        stream.close()
        for fd in (out_w, err_w):
            with contextlib.suppress(OSError):  # closed at STDOUT EOF
                os.close(fd)
    for thread in threads:
        thread.join(60)
    theirs.close()
    for fd in (out_r, err_r):
        os.close(fd)
    return code, bytes(collected[out_r]), bytes(collected[err_r])


def test_output_is_byte_exact_with_interleaved_stderr(mode: str) -> None:
    rng = random.Random(5)
    out_chunks = [rng.randbytes(size) for size in SIZES * 10]
    err_chunks = [rng.randbytes(size % 999 + 1) for size in SIZES * 10]
    wire = b"".join(
        encode(Data(MsgType.DATA_STDOUT, o)) + encode(Data(MsgType.DATA_STDERR, e))
        for o, e in zip(out_chunks, err_chunks, strict=True)
    )
    wire += encode(Data(MsgType.DATA_STDERR, b"")) + encode(Data(MsgType.DATA_STDOUT, b""))
    wire += encode(ExitStatus(42))
    code, out, err = run(wire)
    if mode == "splice":
        assert isinstance(os.splice, SpliceSpy) and os.splice.moved > 0, "never spliced"
    assert code == 42
    assert hashlib.sha256(out).digest() == hashlib.sha256(b"".join(out_chunks)).digest()
    assert err == b"".join(err_chunks)


@pytest.mark.parametrize(
    ("msg_type", "length"),
    [(MsgType.DATA_STDOUT, CHUNK + 1), (MsgType.DATA_STDIN, 4), (0x999, 4)],
)
def test_hostile_header_ends_the_call_before_its_payload(
    mode: str, msg_type: int, length: int
) -> None:
    good = random.Random(6).randbytes(CHUNK)
    wire = encode(Data(MsgType.DATA_STDOUT, good)) + HEADER.pack(msg_type, length) + b"x" * 64
    code, out, _ = run(wire)
    assert code == CLOSED_EARLY_EXIT
    assert out == good


def test_stream_ending_inside_a_frame_is_closed_early(mode: str) -> None:
    wire = encode(Data(MsgType.DATA_STDOUT, b"a" * 100))[:50]
    code, out, _ = run(wire)
    assert code == CLOSED_EARLY_EXIT
    assert out == b""  # whole frames only, spliced or not
