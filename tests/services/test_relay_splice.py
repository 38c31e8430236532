"""The service relay's spliced data path (issue 15) and its copying fallback
(``qrexec.services.splicing`` and the paths of ``qrexec.services.relay`` it stands in for).

Each test runs :func:`relay_process` / :func:`relay_socket` in-process against a real
socketpair "vchan" (the socket backend's asyncio face) and plays the caller from threads:
streams must arrive byte for byte in both directions, frame boundaries at odd sizes
included, whichever path moves them; hostile headers are refused on the spliced path as on
the copying one; a service that stops reading stops the relay reading the vchan.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import logging
import os
import random
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator

import pytest

from qrexec.backends.socket_async import AsyncSocketStream
from qrexec.protocol.constants import MsgType
from qrexec.protocol.framing import FrameDecoder
from qrexec.protocol.messages import HEADER, Data, ExitStatus, Message, encode
from qrexec.protocol.negotiation import max_data_chunk
from qrexec.services import relay

VERSION = 3
CHUNK = max_data_chunk(VERSION)
#: Payload sizes of the caller's frames: odd sizes around the chunk and the pipe pages.
SIZES = [1, 7, CHUNK, CHUNK - 1, 4095, 4097, 3, CHUNK, 65521, 12345, 2, CHUNK]

pytestmark = pytest.mark.timeout(120)


class SpliceSpy:
    """Wraps ``os.splice`` to count the calls that moved bytes."""

    def __init__(self, real: Callable[..., int]) -> None:
        self.real = real
        self.moved = 0

    def __call__(self, *args: object, **kwargs: object) -> int:
        count = self.real(*args, **kwargs)
        if count:
            self.moved += 1
        return count


@pytest.fixture(params=["splice", "no-splice", "einval"])
def mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The three ways the relay may run: spliced, without ``os.splice`` at all, and with a
    kernel that refuses to splice these files (EINVAL)."""
    if request.param == "splice":
        if not hasattr(os, "splice"):
            pytest.fail("os.splice is missing on this Linux: the spliced path is untested")
        spy = SpliceSpy(os.splice)
        monkeypatch.setattr(os, "splice", spy)
        yield "splice"
        assert spy.moved > 0, "the relay never spliced"
        return
    if request.param == "einval":
        monkeypatch.setattr(os, "splice", _refuse)
    else:
        monkeypatch.delattr(os, "splice", raising=False)
    yield request.param


def _refuse(*args: object, **kwargs: object) -> int:
    """A kernel (or sandbox) that will not splice these files."""
    raise OSError(errno.EINVAL, "Invalid argument")


def payloads(sizes: list[int], seed: int) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(size) for size in sizes]


def frames_of(kind: MsgType, chunks: list[bytes]) -> bytes:
    return b"".join(encode(Data(kind, chunk)) for chunk in chunks)


def read_messages(sock: socket.socket) -> list[Message]:
    """Everything the relay sends, up to EXIT_CODE or the end of the vchan."""
    decoder = FrameDecoder(VERSION)
    messages: list[Message] = []
    try:
        while data := sock.recv(1 << 16):
            messages.extend(decoder.feed(data))
            if messages and isinstance(messages[-1], ExitStatus):
                break
    except ConnectionResetError:  # the relay hung up with our bytes unread
        pass
    return messages


def joined(messages: list[Message], kind: MsgType) -> tuple[bytes, bool]:
    """The payload of ``kind`` and whether its EOF came; every frame within the chunk."""
    parts = [m for m in messages if isinstance(m, Data) and m.msg_type is kind]
    assert all(len(m.data) <= CHUNK for m in parts)
    eof = bool(parts) and parts[-1].data == b""
    return b"".join(m.data for m in parts), eof


async def run_relay_process(caller: socket.socket, argv: list[str]) -> int | None:
    ours, theirs = socket.socketpair()
    stdout_r, stdout_w = os.pipe()
    stderr_r, stderr_w = os.pipe()
    proc = subprocess.Popen(argv, stdin=theirs.fileno(), stdout=stdout_w, stderr=stderr_w)
    theirs.close()
    os.close(stdout_w)
    os.close(stderr_w)
    stream = AsyncSocketStream(caller, 0, 1)
    try:
        channel = relay.DataChannel(stream, VERSION)
        return await relay.relay_process(channel, proc, ours, stdout_r, stderr_r)
    finally:
        stream.close()


def test_process_stream_is_byte_exact_both_ways(mode: str) -> None:
    """dom0 -> VM frames of odd sizes reach ``cat`` and come back VM -> dom0 intact."""
    chunks = payloads(SIZES * 20, seed=1)
    sent = b"".join(chunks)
    test_end, relay_end = socket.socketpair()
    messages: list[Message] = []

    def write() -> None:
        test_end.sendall(frames_of(MsgType.DATA_STDIN, [*chunks, b""]))

    def read() -> None:
        messages.extend(read_messages(test_end))

    threads = [threading.Thread(target=write), threading.Thread(target=read)]
    for thread in threads:
        thread.start()
    code = asyncio.run(run_relay_process(relay_end, ["cat"]))
    for thread in threads:
        thread.join(60)
    test_end.close()
    assert code == 0
    stdout, stdout_eof = joined(messages, MsgType.DATA_STDOUT)
    assert stdout_eof and joined(messages, MsgType.DATA_STDERR) == (b"", True)
    assert hashlib.sha256(stdout).hexdigest() == hashlib.sha256(sent).hexdigest()
    assert messages[-1] == ExitStatus(0)


async def run_relay_socket(caller: socket.socket, service: socket.socket) -> int | None:
    stream = AsyncSocketStream(caller, 0, 1)
    try:
        channel = relay.DataChannel(stream, VERSION)
        return await relay.relay_socket(
            channel, service, exit_on_client_eof=False, exit_on_service_eof=False
        )
    finally:
        stream.close()


def test_socket_service_stream_is_byte_exact_both_ways(mode: str) -> None:
    """A socket service gets the caller's bytes exactly and its own reach the caller."""
    chunks = payloads(SIZES * 10, seed=2)
    reply = random.Random(3).randbytes(3 * CHUNK + 777)
    test_end, relay_end = socket.socketpair()
    service_end, relay_service = socket.socketpair()
    received = hashlib.sha256()
    messages: list[Message] = []

    def serve() -> None:
        while data := service_end.recv(1 << 16):
            received.update(data)
        service_end.sendall(reply)
        service_end.close()

    def call() -> None:
        test_end.sendall(frames_of(MsgType.DATA_STDIN, [*chunks, b""]))
        messages.extend(read_messages(test_end))

    threads = [threading.Thread(target=serve), threading.Thread(target=call)]
    for thread in threads:
        thread.start()
    code = asyncio.run(run_relay_socket(relay_end, relay_service))
    for thread in threads:
        thread.join(60)
    test_end.close()
    assert code == 0
    assert received.hexdigest() == hashlib.sha256(b"".join(chunks)).hexdigest()
    assert joined(messages, MsgType.DATA_STDOUT) == (reply, True)
    assert messages[-1] == ExitStatus(0)


@pytest.mark.parametrize(
    ("msg_type", "length", "reason"),
    [
        (MsgType.DATA_STDIN, CHUNK + 1, "above the limit"),
        (MsgType.DATA_STDOUT, 10, "unexpected message DATA_STDOUT"),
        (0x999, 10, "unknown message type"),
    ],
)
def test_hostile_header_is_refused_before_its_payload(
    mode: str, msg_type: int, length: int, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A bad header after good frames ends the call as before; nothing of it is delivered."""
    good = payloads([5, CHUNK, 9], seed=4)
    test_end, relay_end = socket.socketpair()
    service_end, relay_service = socket.socketpair()
    received = bytearray()

    def serve() -> None:
        while data := service_end.recv(1 << 16):
            received.extend(data)
        service_end.close()

    def call() -> None:
        hostile = HEADER.pack(msg_type, length) + b"\xaa" * 100
        test_end.sendall(frames_of(MsgType.DATA_STDIN, good) + hostile)
        # The relay stops at the bad header: it must not wait for more from us.
        read_messages(test_end)

    threads = [threading.Thread(target=serve), threading.Thread(target=call)]
    for thread in threads:
        thread.start()
    with caplog.at_level(logging.WARNING, logger="qrexec.services.relay"):
        code = asyncio.run(run_relay_socket(relay_end, relay_service))
    for thread in threads:
        thread.join(60)
    test_end.close()
    assert code is None
    # Whole frames before the bad one may be delivered or dropped (the copying path drops
    # those that came in the same read); never a byte of the bad one or beyond.
    assert b"".join(good).startswith(bytes(received))
    assert any(reason in record.getMessage() for record in caplog.records)


def test_service_that_stops_reading_stops_the_relay(mode: str) -> None:
    """A service that never reads its stdin: the relay holds a bounded amount (kernel
    buffers, one frame in the pipe) and stops reading the vchan, so the caller blocks."""
    test_end, relay_end = socket.socketpair()
    service_end, relay_service = socket.socketpair()
    frame = encode(Data(MsgType.DATA_STDIN, bytes(CHUNK)))
    sent = 0
    stalled = threading.Event()

    messages: list[Message] = []

    def call() -> None:
        nonlocal sent
        test_end.settimeout(2.0)
        try:
            while sent < 512 << 20:
                test_end.sendall(frame)
                sent += len(frame)
        except TimeoutError:
            stalled.set()
        test_end.settimeout(60)
        # The service goes away: the relay sees EPIPE, drops the rest and ends the call.
        service_end.close()
        messages.extend(read_messages(test_end))

    caller = threading.Thread(target=call)
    caller.start()
    code = asyncio.run(run_relay_socket(relay_end, relay_service))
    caller.join(60)
    test_end.close()
    assert code == 0
    assert messages[-1] == ExitStatus(0)
    assert stalled.is_set(), "the caller was never held back"
    # Socket buffers of a few MiB at most (vchan both ends, service socket, one pipe).
    assert sent < 64 << 20
