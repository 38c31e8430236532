"""The service relay's splice paths (qrexec/services/splicing.py) on real sockets.

Bytes arrive exact and in order, frame checks still apply, a service that closes its
stdin gets nothing more (and the caller's rest is dropped), and a caller that sends a
frame in tiny pieces - which fills the intermediate pipe's slots long before its bytes -
is served through memory instead of making the relay spin or stall.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import threading

import pytest

from qrexec.backends.socket_async import AsyncSocketStream
from qrexec.protocol.constants import MsgType
from qrexec.protocol.messages import Data, encode
from qrexec.services.splicing import can_splice, frame_pipe, relay_stdin_spliced

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(not hasattr(os, "splice"), reason="needs Linux splice"),
]


def _read_all(sock: socket.socket, into: bytearray) -> None:
    while chunk := sock.recv(1 << 20):
        into += chunk


def _relay(
    send: object, *, close_service_stdin_after: int | None = None
) -> tuple[bool, bytes, int]:
    """Run relay_stdin_spliced between a caller (``send(sock)`` in a thread) and a
    service socket; (result, what the service read, how often end() was called)."""
    caller, ours = socket.socketpair()
    service_in, service_out = socket.socketpair()
    received = bytearray()
    ends: list[int] = []

    def service() -> None:
        if close_service_stdin_after is None:
            _read_all(service_out, received)
            return
        while len(received) < close_service_stdin_after:
            received.extend(service_out.recv(close_service_stdin_after - len(received)))
        service_out.close()

    async def main() -> bool:
        stream = AsyncSocketStream(ours, 1, 513)
        assert can_splice(stream)
        pipe = frame_pipe(65536)
        assert pipe is not None
        service_in.setblocking(False)

        def end() -> None:
            ends.append(1)
            service_in.shutdown(socket.SHUT_WR)

        return await relay_stdin_spliced(stream, 3, service_in.fileno(), pipe, end)

    reader = threading.Thread(target=service)
    writer = threading.Thread(target=send, args=(caller,))  # type: ignore[arg-type]
    reader.start()
    writer.start()
    try:
        result = asyncio.run(main())
        writer.join(30)
        service_in.close()
        reader.join(30)
    finally:
        caller.close()
        ours.close()
        service_out.close()
    return result, bytes(received), len(ends)


def test_frames_arrive_exact_and_eof_ends_the_service_stdin() -> None:
    payloads = [os.urandom(n) for n in (1, 65536, 4000, 65536, 65535, 7)]

    def send(sock: socket.socket) -> None:
        for data in payloads:
            sock.sendall(encode(Data(MsgType.DATA_STDIN, data)))
        sock.sendall(encode(Data(MsgType.DATA_STDIN, b"")))
        sock.sendall(encode(Data(MsgType.DATA_STDIN, b"after EOF: dropped")))
        sock.close()

    result, received, ends = _relay(send)
    assert (result, received, ends) == (False, b"".join(payloads), 1)


def test_a_frame_sent_byte_by_byte_is_served_through_memory_without_spinning(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    copied: list[int] = []
    real_recv = AsyncSocketStream.recv

    async def recv(self: AsyncSocketStream, max_bytes: int) -> bytes:
        data = await real_recv(self, max_bytes)
        copied.append(len(data))
        return data

    monkeypatch.setattr(AsyncSocketStream, "recv", recv)
    slow = os.urandom(5000)
    after = os.urandom(70000 - 8)[:65536]

    def send(sock: socket.socket) -> None:
        sock.sendall(encode(Data(MsgType.DATA_STDIN, b"first")))
        sock.sendall(struct.pack("<II", MsgType.DATA_STDIN, len(slow)))
        for byte in slow:  # one skb each: the pipe runs out of slots long before bytes
            sock.sendall(bytes([byte]))
        sock.sendall(encode(Data(MsgType.DATA_STDIN, after)))
        sock.sendall(encode(Data(MsgType.DATA_STDIN, b"")))
        sock.close()

    started = os.times()
    result, received, ends = _relay(send)
    spent = os.times()
    assert (result, received, ends) == (False, b"first" + slow + after, 1)
    assert 0 < sum(copied) <= len(slow)  # part of the slow frame came through memory
    # A spinning relay would burn CPU for as long as the sender takes; this one waits.
    assert (spent.user + spent.system) - (started.user + started.system) < 20


def test_a_bad_header_ends_the_relay_before_any_of_its_payload_moves() -> None:
    def send(sock: socket.socket) -> None:
        sock.sendall(encode(Data(MsgType.DATA_STDIN, b"ok")))
        sock.sendall(struct.pack("<II", MsgType.DATA_STDOUT, 3) + b"bad")
        sock.sendall(encode(Data(MsgType.DATA_STDIN, b"never")))
        sock.close()

    result, received, ends = _relay(send)
    assert (result, received, ends) == (False, b"ok", 0)


def test_a_frame_cut_short_is_not_delivered() -> None:
    def send(sock: socket.socket) -> None:
        sock.sendall(encode(Data(MsgType.DATA_STDIN, b"whole")))
        sock.sendall(encode(Data(MsgType.DATA_STDIN, os.urandom(60000)))[:30000])
        sock.close()

    result, received, _ = _relay(send)
    assert (result, received) == (False, b"whole")


def test_a_service_that_closes_its_stdin_gets_nothing_more_and_the_rest_is_dropped() -> None:
    first = os.urandom(65536)

    def send(sock: socket.socket) -> None:
        sock.sendall(encode(Data(MsgType.DATA_STDIN, first)))
        for _ in range(20):  # well past what the socket buffers hold
            sock.sendall(encode(Data(MsgType.DATA_STDIN, os.urandom(65536))))
        sock.sendall(encode(Data(MsgType.DATA_STDIN, b"")))
        sock.close()

    result, received, ends = _relay(send, close_service_stdin_after=len(first))
    assert (result, received, ends) == (False, first, 1)


def _pump(source_writes: list[bytes], *, socket_source: bool) -> list[tuple[MsgType, bytes]]:
    """pump_spliced from a service's stdout (socket or pipe) written as ``source_writes``;
    the frames the caller receives."""
    from qrexec.protocol.framing import FrameDecoder
    from qrexec.services.splicing import pump_spliced

    caller, ours = socket.socketpair()
    tiny = next((i for i, data in enumerate(source_writes) if len(data) > 1), 0)
    if socket_source:
        service_side, source = socket.socketpair()
        # Room for the tiny pieces to queue up before the pump starts (capped by wmem_max).
        service_side.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        write_fd, read_fd = service_side.fileno(), source.fileno()
        source.setblocking(False)
    else:
        read_fd, write_fd = os.pipe2(os.O_NONBLOCK)
        os.set_blocking(write_fd, True)
    frames: list[tuple[MsgType, bytes]] = []
    queued = threading.Event()

    def service() -> None:
        for index, data in enumerate(source_writes):
            if index == tiny:
                queued.set()
            os.write(write_fd, data)
        queued.set()
        if socket_source:
            service_side.shutdown(socket.SHUT_WR)
        else:
            os.close(write_fd)

    def receive() -> None:
        decoder = FrameDecoder(3)
        while chunk := caller.recv(1 << 20):
            frames.extend((m.msg_type, m.data) for m in decoder.feed(chunk))  # type: ignore[attr-defined]

    async def main() -> None:
        stream = AsyncSocketStream(ours, 1, 513)
        await pump_spliced(stream, MsgType.DATA_STDOUT, read_fd, 65536, lambda: None,
                           frame_pipe(65536))  # fmt: skip
        stream.close()

    threads = [threading.Thread(target=service), threading.Thread(target=receive)]
    for thread in threads:
        thread.start()
    queued.wait(2)  # the tiny pieces are queued (or the writer is blocked on them)
    try:
        asyncio.run(main())
        for thread in threads:
            thread.join(30)
    finally:
        caller.close()
        if socket_source:
            service_side.close()
            source.close()
        else:
            os.close(read_fd)
    return frames


@pytest.mark.parametrize("socket_source", [True, False])
def test_pumped_output_arrives_exact_in_frames_of_at_most_a_chunk(
    socket_source: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    from qrexec.services import splicing

    through_memory: list[int] = []
    real = splicing._assemble

    def assemble(fd: int, own: tuple[int, int], header: bytearray, count: int) -> bytes | None:
        payload = real(fd, own, header, count)
        if payload is not None:
            through_memory.append(len(payload))
        return payload

    monkeypatch.setattr(splicing, "_assemble", assemble)
    # Tiny pieces first: on a socket each is an skb of its own, and an skb takes a pipe
    # slot whatever its size, so the pipe runs out of slots long before bytes.
    writes = [bytes([b]) for b in os.urandom(3000)]
    writes += [os.urandom(n) for n in (100, 1 << 20, 3, 65537, 250_000, 70000)]
    frames = _pump(writes, socket_source=socket_source)
    assert all(kind is MsgType.DATA_STDOUT and 0 < len(data) <= 65536 for kind, data in frames)
    assert b"".join(data for _, data in frames) == b"".join(writes)
    if socket_source:
        assert through_memory  # the frame the slots could not hold went through memory
