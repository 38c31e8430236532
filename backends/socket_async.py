"""The asyncio face of the unix-socket vchan emulation.

Built on a callback :class:`asyncio.BufferedProtocol` rather than asyncio streams (streams
measured 3-5x slower on bulk data here): the transport reads straight into a fixed receive
buffer, and both directions use pause/resume flow control, so memory per stream is bounded
by ``RECV_BUFFER_SIZE`` plus the write high-water mark plus one ``SEND_CHUNK`` whatever the
speed of either side. File names, layouts and the retry rule come from
:mod:`qrexec.backends.socket`; this module only adds the event-loop plumbing.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from pathlib import Path

from qrexec.backends.socket_setup import (
    CONNECT_RETRY_FIRST,
    BoundSocket,
    connect_once,
    next_retry_delay,
)
from qrexec.errors import TransportBroken, TransportClosed

log = logging.getLogger(__name__)

RECV_BUFFER_SIZE = 256 * 1024
WRITE_HIGH_WATER = 256 * 1024
WRITE_LOW_WATER = 64 * 1024
#: ``send`` hands the transport at most this much at a time, waiting for room in between,
#: so a single huge ``send`` never copies its whole payload into the transport's buffer.
SEND_CHUNK = 256 * 1024
#: After ``close``, a peer that never reads gets this long to take our buffered bytes
#: before the connection is aborted, so a stuck peer cannot pin an fd forever.
CLOSE_FLUSH_TIMEOUT = 30.0


def _wake(waiter: asyncio.Future[None] | None) -> None:
    if waiter is not None and not waiter.done():
        waiter.set_result(None)


class _StreamProtocol(asyncio.BufferedProtocol):
    """Receive buffer and flow-control state of one stream.

    Received bytes live in ``buf[start:end]``. Free space is only ever at the end: when the
    end is reached, reading pauses until the reader has emptied the buffer, which avoids
    moving bytes around at the cost of one pause per buffer-full.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray(RECV_BUFFER_SIZE)
        self.view = memoryview(self.buf)
        self.start = 0
        self.end = 0
        self.eof = False
        self.lost = False
        self.reading_paused = False
        self.writing_paused = False
        self.read_waiter: asyncio.Future[None] | None = None
        self.write_waiter: asyncio.Future[None] | None = None
        self.lost_waiter: asyncio.Future[None] = loop.create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER, low=WRITE_LOW_WATER)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.view[self.end :]

    def buffer_updated(self, nbytes: int) -> None:
        self.end += nbytes
        if self.end == len(self.buf) and self.transport is not None:
            self.reading_paused = True
            self.transport.pause_reading()
        _wake(self.read_waiter)

    def eof_received(self) -> bool:
        # No half-close on vchan: the peer's EOF means it is gone; let the transport close.
        self.eof = True
        _wake(self.read_waiter)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None:
            log.debug("vchan socket lost: %s", exc)
        self.eof = True
        self.lost = True
        _wake(self.read_waiter)
        _wake(self.write_waiter)
        _wake(self.lost_waiter)

    def pause_writing(self) -> None:
        self.writing_paused = True

    def resume_writing(self) -> None:
        self.writing_paused = False
        _wake(self.write_waiter)

    def consume(self, max_bytes: int) -> bytes:
        count = min(max_bytes, self.end - self.start)
        data = bytes(self.view[self.start : self.start + count])
        self.start += count
        if self.start == self.end:
            self.start = self.end = 0
            if self.reading_paused and not self.lost and self.transport is not None:
                self.reading_paused = False
                self.transport.resume_reading()
        return data

    async def wait_readable(self) -> None:
        if self.read_waiter is None or self.read_waiter.done():
            self.read_waiter = self.loop.create_future()
        await self.read_waiter

    async def wait_writable(self) -> None:
        if self.write_waiter is None or self.write_waiter.done():
            self.write_waiter = self.loop.create_future()
        await self.write_waiter


class AsyncSocketStream:
    """A connected emulated vchan, asyncio face (see :class:`~qrexec.backends.base.AsyncStream`)."""

    def __init__(
        self, transport: asyncio.Transport, protocol: _StreamProtocol, remote_domain: int, port: int
    ) -> None:
        self._transport = transport
        self._protocol = protocol
        self._remote_domain = remote_domain
        self._port = port
        self._closed = False

    @property
    def remote_domain(self) -> int:
        return self._remote_domain

    @property
    def port(self) -> int:
        return self._port

    def __repr__(self) -> str:
        return f"<AsyncSocketStream remote={self._remote_domain} port={self._port}>"

    def _check_sendable(self) -> None:
        if self._closed:
            raise TransportClosed("send: the vchan was closed by this side")
        if self._protocol.lost or self._protocol.eof or self._transport.is_closing():
            raise TransportBroken(
                f"send: peer domain {self._remote_domain} port {self._port} is gone"
            )

    async def send(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        # Chunks of an immutable ``bytes`` can be handed over as views; anything else is
        # copied, since the caller may reuse its buffer once we return.
        immutable = isinstance(data, bytes)
        protocol = self._protocol
        for offset in range(0, len(view), SEND_CHUNK):
            self._check_sendable()
            chunk = view[offset : offset + SEND_CHUNK]
            self._transport.write(chunk if immutable else bytes(chunk))
            while protocol.writing_paused:
                self._check_sendable()
                await protocol.wait_writable()
        # A write that failed (EPIPE) closes the transport at once; report it now.
        self._check_sendable()

    async def recv(self, max_bytes: int) -> bytes:
        if max_bytes <= 0:
            raise ValueError(f"recv size must be positive, not {max_bytes}")
        protocol = self._protocol
        while True:
            if self._closed:
                raise TransportClosed("recv: the vchan was closed by this side")
            if protocol.end > protocol.start:
                return protocol.consume(max_bytes)
            if protocol.eof:
                return b""
            await protocol.wait_readable()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        protocol = self._protocol
        _wake(protocol.read_waiter)
        _wake(protocol.write_waiter)
        try:
            # Transport.close() still flushes what send() accepted.
            self._transport.close()
            if not protocol.lost and self._transport.get_write_buffer_size() > 0:
                protocol.loop.call_later(CLOSE_FLUSH_TIMEOUT, self._abort_if_stuck)
        except Exception as exc:  # close must never raise
            log.debug("error while closing a vchan socket: %s", exc)

    def _abort_if_stuck(self) -> None:
        if not self._protocol.lost:
            log.warning(
                "domain %d port %d did not read our last bytes within %s s; aborting",
                self._remote_domain,
                self._port,
                CLOSE_FLUSH_TIMEOUT,
            )
            self._transport.abort()

    async def aclose(self) -> None:
        self.close()
        try:
            await asyncio.shield(self._protocol.lost_waiter)
        except asyncio.CancelledError:
            self._transport.abort()
            raise


async def _wrap(sock: socket.socket, remote_domain: int, port: int) -> AsyncSocketStream:
    loop = asyncio.get_running_loop()
    try:
        transport, protocol = await loop.connect_accepted_socket(
            lambda: _StreamProtocol(loop), sock
        )
    except BaseException:
        sock.close()
        raise
    assert isinstance(transport, asyncio.Transport)
    return AsyncSocketStream(transport, protocol, remote_domain, port)


class AsyncSocketListener:
    """A server waiting for its one client, asyncio face."""

    def __init__(self, bound: BoundSocket, remote_domain: int, port: int) -> None:
        bound.sock.setblocking(False)
        self._bound = bound
        self._remote_domain = remote_domain
        self._port = port
        self._closed = False
        self._fd = bound.sock.fileno()
        self._reader_loop: asyncio.AbstractEventLoop | None = None
        self._waiter: asyncio.Future[None] | None = None

    @property
    def path(self) -> Path:
        return self._bound.path

    def _stop_watching(self) -> None:
        if self._reader_loop is not None:
            self._reader_loop.remove_reader(self._fd)
            self._reader_loop = None

    async def accept(self) -> AsyncSocketStream:
        loop = asyncio.get_running_loop()
        while True:
            if self._closed:
                raise TransportClosed("accept: the listener was closed")
            if self._waiter is not None:
                raise RuntimeError("accept() is already waiting on this listener")
            try:
                conn, _ = self._bound.sock.accept()
                break
            except BlockingIOError:
                pass
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiter = waiter
            self._reader_loop = loop
            loop.add_reader(self._fd, _wake, waiter)
            try:
                await waiter
            finally:
                self._stop_watching()
                self._waiter = None
        # One connection per server: nobody else may connect to this name.
        self.close()
        return await _wrap(conn, self._remote_domain, self._port)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._stop_watching()
            _wake(self._waiter)
            self._bound.sock.close()
        except Exception as exc:  # close must never raise
            log.debug("error while closing a vchan listener: %s", exc)
        self._bound.unlink_if_ours()


async def connect(
    path: Path, remote_domain: int, port: int, timeout: float | None
) -> AsyncSocketStream:
    """Connect to ``path``, retrying with back-off while no server takes the call."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    deadline = None if timeout is None else started + timeout
    delay = CONNECT_RETRY_FIRST
    while True:
        sock = connect_once(path)
        if sock is not None:
            return await _wrap(sock, remote_domain, port)
        if deadline is not None:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(
                    f"no vchan server of domain {remote_domain} port {port} appeared "
                    f"within {timeout} s ({path})"
                )
            await asyncio.sleep(min(delay, remaining))
        else:
            await asyncio.sleep(delay)
        delay = next_retry_delay(delay, loop.time() - started)
