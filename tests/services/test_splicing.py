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
