"""An in-process stand-in for a connected pair of libxenvchan rings (tests only).

It reproduces what the vchan faces rely on - bounded rings, partial writes, an event fd
that stays readable until acknowledged, ``is_open`` states, peer death - so the faces'
waiting and flow-control logic can be exercised without a hypervisor. It does not
pretend to test libxenvchan itself: the real-Xen job does that.
"""

from __future__ import annotations

import contextlib
import os
import threading

CONNECTED, DISCONNECTED = 1, 0


class _Shared:
    def __init__(self, capacity: int) -> None:
        self.lock = threading.Lock()
        self.capacity = capacity
        self.buffers = (bytearray(), bytearray())  # data for side 0, data for side 1
        self.live = [True, True]
        self.pipes = (os.pipe(), os.pipe())
        for r, _w in self.pipes:
            os.set_blocking(r, False)

    def notify(self, side: int) -> None:
        os.write(self.pipes[side][1], b"!")


class FakeRing:
    def __init__(self, shared: _Shared, side: int, remote_domain: int, port: int) -> None:
        self._s = shared
        self._side = side
        self.remote_domain = remote_domain
        self.port = port
        self.fd = shared.pipes[side][0]
        self.closed = False
        self.is_server = side == 0
        self.peer_dead = False

    @property
    def _peer(self) -> int:
        return 1 - self._side

    def is_open(self) -> int:
        with self._s.lock:
            return CONNECTED if self._s.live[self._peer] and not self.peer_dead else DISCONNECTED

    def acknowledge_event(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.read(self.fd, 4096)

    def read(self, max_bytes: int) -> bytes | None:
        with self._s.lock:
            buf = self._s.buffers[self._side]
            if buf:
                data = bytes(buf[:max_bytes])
                del buf[:max_bytes]
                self._s.notify(self._peer)
                return data
            if not self._s.live[self._peer] or self.peer_dead:
                return None
            return b""

    def read_into(self, buffer: bytearray | memoryview) -> int | None:
        data = self.read(len(buffer))
        if data is None:
            return None
        buffer[: len(data)] = data
        return len(data)

    def write(self, data: memoryview) -> int:
        with self._s.lock:
            if not self._s.live[self._peer] or self.peer_dead:
                return -1
            buf = self._s.buffers[self._peer]
            room = self._s.capacity - len(buf)
            n = min(room, len(data))
            if n:
                buf += data[:n]
                self._s.notify(self._peer)
            return n

    def peer_alive(self, fallback: object = None) -> bool:
        return not self.peer_dead

    def on_connected(self) -> None:
        pass

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        with self._s.lock:
            self._s.live[self._side] = False
            self._s.notify(self._peer)


def ring_pair(capacity: int = 65536) -> tuple[FakeRing, FakeRing]:
    shared = _Shared(capacity)
    return FakeRing(shared, 0, 1, 600), FakeRing(shared, 1, 0, 600)
