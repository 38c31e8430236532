"""Raw qrexec messages over any byte stream, for the byte-level differential tests.

Nothing here parses payloads: a message is ``(type, payload bytes)`` exactly as the program
under test sent it, so the comparison between Qubes' C programs and ours sees every byte.
"""

from __future__ import annotations

import queue
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

HEADER = struct.Struct("<II")

DATA_STDIN = 0x190
DATA_STDOUT = 0x191
DATA_STDERR = 0x192
DATA_EXIT_CODE = 0x193
EXEC_CMDLINE = 0x200
JUST_EXEC = 0x201
SERVICE_CONNECT = 0x202
SERVICE_REFUSED = 0x203
TRIGGER_SERVICE = 0x210
CONNECTION_TERMINATED = 0x211
TRIGGER_SERVICE3 = 0x212
TRIGGER_SERVICE4 = 0x213
HELLO = 0x300

NAMES = {
    value: name
    for name, value in globals().items()
    if name.isupper() and isinstance(value, int) and name != "HEADER"
}

Msg = tuple[int, bytes]


def msg(msg_type: int, payload: bytes = b"") -> bytes:
    """One framed message: the 8-byte header then the payload."""
    return HEADER.pack(msg_type, len(payload)) + payload


def u32(*values: int) -> bytes:
    return struct.pack(f"<{len(values)}I", *values)


def i32(value: int) -> bytes:
    return struct.pack("<i", value)


def show(messages: list[Msg]) -> str:
    """A readable form for assertion messages."""
    return ", ".join(f"{NAMES.get(t, hex(t))}({p!r})" for t, p in messages)


@dataclass
class Transcript:
    """What a peer sent until it went quiet or closed."""

    messages: list[Msg] = field(default_factory=list)
    closed: bool = False

    def __repr__(self) -> str:
        return f"[{show(self.messages)}]{' closed' if self.closed else ' open'}"


class RawConn:
    """A connected byte stream read by a background thread, message by message."""

    def __init__(self, recv: Callable[[int], bytes], send: Callable[[bytes], None]) -> None:
        self._recv = recv
        self._send = send
        self._queue: queue.Queue[Msg | None] = queue.Queue()
        self.closed = False
        threading.Thread(target=self._read_all, daemon=True).start()

    @classmethod
    def of_socket(cls, sock: socket.socket) -> RawConn:
        return cls(sock.recv, sock.sendall)

    def _read_exact(self, size: int) -> bytes | None:
        data = b""
        while len(data) < size:
            try:
                chunk = self._recv(size - len(data))
            except OSError:
                return None
            if not chunk:
                return None
            data += chunk
        return data

    def _read_all(self) -> None:
        while True:
            head = self._read_exact(HEADER.size)
            if head is None:
                break
            msg_type, length = HEADER.unpack(head)
            payload = self._read_exact(length) if length else b""
            if payload is None:
                break
            self._queue.put((msg_type, payload))
        self._queue.put(None)

    def send(self, data: bytes) -> None:
        self._send(data)

    def read(self, timeout: float) -> Msg | None:
        """The next message; None when the peer closed. TimeoutError when none came."""
        if self.closed:
            return None
        try:
            item = self._queue.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError("the peer sent nothing") from None
        if item is None:
            self.closed = True
        return item

    def expect(self, msg_type: int, timeout: float = 10) -> bytes:
        item = self.read(timeout)
        assert item is not None and item[0] == msg_type, f"expected {NAMES[msg_type]}: {item!r}"
        return item[1]

    def collect(self, quiet: float, limit: float = 15, until_closed: bool = False) -> Transcript:
        """Messages until the peer closes, or (unless ``until_closed``) is quiet for ``quiet``
        seconds; at most ``limit`` seconds in all."""
        out = Transcript()
        deadline = time.monotonic() + limit
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                item = self.read(remaining if until_closed else min(quiet, remaining))
            except TimeoutError:
                break
            if item is None:
                out.closed = True
                break
            out.messages.append(item)
        return out
