"""The asyncio face of the unix-socket vchan emulation.

Bytes move with non-blocking ``recv_into``/``send`` calls made straight on the socket,
with the event loop used only to wait (``add_reader``/``add_writer``) when the kernel has
nothing to give or no room to take. There is no receive buffer and no send buffer in user
space: ``recv_into`` fills the caller's buffer, ``send`` hands the caller's bytes to the
kernel and returns once it took all of them. So the kernel's socket buffers are the whole
of the backpressure (as vchan rings are on Xen), memory per stream stays constant whatever
the speed of either side, and the bulk path makes no copy of its own. (An earlier version
used ``asyncio.BufferedProtocol`` with pause/resume flow control: it copied every byte once
more on each side and measured ~0.3x a plain blocking copy, against ~0.9x for this.)

File names, layouts and the retry rule come from :mod:`qrexec.backends.socket`; this
module only adds the event-loop plumbing.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from pathlib import Path

from qrexec.backends.socket_setup import (
    CONNECT_RETRY_FIRST,
    CONNECT_RETRY_YIELD_FOR,
    RECV_CHUNK_MAX,
    SEND_BUFFER_SIZE,
    BoundSocket,
    bytes_waiting,
    connect_once,
    next_retry_delay,
)
from qrexec.errors import TransportBroken, TransportClosed

log = logging.getLogger(__name__)

#: ``splice`` never blocks (the loop waits instead) and moves pages rather than copying.
SPLICE_FLAGS = getattr(os, "SPLICE_F_NONBLOCK", 0) | getattr(os, "SPLICE_F_MOVE", 0)


def _wake(waiter: asyncio.Future[None] | None) -> None:
    if waiter is not None and not waiter.done():
        waiter.set_result(None)


class AsyncSocketStream:
    """A connected emulated vchan, asyncio face (see :class:`~qrexec.backends.base.AsyncStream`).

    One ``send`` runs at a time (later ones wait their turn), so the bytes of one ``send``
    are never interleaved with another's: a frame sent whole stays whole even when the
    kernel takes it in pieces.
    """

    def __init__(self, sock: socket.socket, remote_domain: int, port: int) -> None:
        sock.setblocking(False)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_SIZE)
        except OSError as exc:  # a smaller buffer only costs wake-ups
            log.debug("cannot enlarge the vchan socket's send buffer: %s", exc)
        self._sock = sock
        self._fd = sock.fileno()
        self._loop = asyncio.get_running_loop()
        self._remote_domain = remote_domain
        self._port = port
        self._closed = False
        self._read_waiter: asyncio.Future[None] | None = None
        self._write_waiter: asyncio.Future[None] | None = None
        self._watching_read = False
        self._watching_write = False
        self._send_lock = asyncio.Lock()

    @property
    def remote_domain(self) -> int:
        return self._remote_domain

    @property
    def port(self) -> int:
        return self._port

    def __repr__(self) -> str:
        return f"<AsyncSocketStream remote={self._remote_domain} port={self._port}>"

    # Waiting: the fd stays registered with the loop from one wait to the next (a wait
    # right after a wake costs no epoll_ctl); a readiness callback that finds nobody
    # waiting unregisters it, since level-triggered readiness would otherwise spin.

    def _on_readable(self) -> None:
        waiter = self._read_waiter
        if waiter is None:
            self._loop.remove_reader(self._fd)
            self._watching_read = False
            return
        self._read_waiter = None
        _wake(waiter)

    def _on_writable(self) -> None:
        waiter = self._write_waiter
        if waiter is None:
            self._loop.remove_writer(self._fd)
            self._watching_write = False
            return
        self._write_waiter = None
        _wake(waiter)

    async def _wait_readable(self) -> None:
        waiter = self._loop.create_future()
        self._read_waiter = waiter
        if not self._watching_read:
            self._loop.add_reader(self._fd, self._on_readable)
            self._watching_read = True
        try:
            await waiter
        finally:
            self._read_waiter = None

    async def _wait_writable(self) -> None:
        waiter = self._loop.create_future()
        self._write_waiter = waiter
        if not self._watching_write:
            self._loop.add_writer(self._fd, self._on_writable)
            self._watching_write = True
        try:
            await waiter
        finally:
            self._write_waiter = None

    def _broken(self, exc: OSError) -> TransportBroken:
        return TransportBroken(
            f"send: peer domain {self._remote_domain} port {self._port} is gone ({exc})"
        )

    async def send(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        async with self._send_lock:
            await self._send_locked(view, socket.MSG_NOSIGNAL)

    async def _send_locked(self, view: memoryview, flags: int) -> None:
        while True:
            if self._closed:
                raise TransportClosed("send: the vchan was closed by this side")
            try:
                sent = self._sock.send(view, flags)
            except BlockingIOError:
                await self._wait_writable()
                continue
            except OSError as exc:
                if self._closed:
                    raise TransportClosed("send: the vchan was closed by this side") from exc
                raise self._broken(exc) from exc
            if sent == len(view):
                return
            view = view[sent:]

    async def recv_into(self, buffer: bytearray | memoryview) -> int:
        """Fill the start of ``buffer`` with 1..len(buffer) bytes; 0 at end of stream.

        The bytes go from the kernel straight into ``buffer``, with no copy in between.
        """
        if len(buffer) <= 0:
            raise ValueError("recv_into needs a non-empty buffer")
        while True:
            if self._closed:
                raise TransportClosed("recv: the vchan was closed by this side")
            try:
                return self._sock.recv_into(buffer)
            except BlockingIOError:
                await self._wait_readable()
            except ConnectionResetError:
                # The peer closed with bytes of ours unread: for vchan that is just "gone".
                return 0
            except OSError as exc:
                if self._closed:
                    raise TransportClosed("recv: the vchan was closed by this side") from exc
                raise TransportBroken(f"recv from domain {self._remote_domain}: {exc}") from exc

    async def splice_into(self, pipe_fd: int, count: int) -> int:
        """Move 1..``count`` bytes from the vchan into the pipe ``pipe_fd`` (Linux
        ``splice``: the kernel hands over page references, nothing passes through user
        space); 0 at end of stream.

        Raises :class:`BlockingIOError` when bytes are waiting but the pipe cannot take
        any (out of room or out of slots): the caller empties it and takes the bytes
        another way. Never spins.
        """
        while True:
            if self._closed:
                raise TransportClosed("recv: the vchan was closed by this side")
            try:
                return os.splice(self._fd, pipe_fd, count, flags=SPLICE_FLAGS)
            except BlockingIOError:
                if bytes_waiting(self._fd):
                    # Bytes wait but the pipe took none: it is out of slots (a peer that
                    # sends in tiny pieces fills them). The caller must empty it.
                    raise
                await self._wait_readable()
            except ConnectionResetError:
                return 0
            except OSError as exc:
                if self._closed:
                    raise TransportClosed("recv: the vchan was closed by this side") from exc
                raise TransportBroken(f"recv from domain {self._remote_domain}: {exc}") from exc

    async def splice_from(
        self, header: bytes | bytearray | memoryview, pipe_fd: int, count: int
    ) -> None:
        """Send ``header``, then ``count`` bytes that are already in the pipe ``pipe_fd``,
        moved by the kernel (Linux ``splice``): one frame, never interleaved with another
        ``send``. A pipe that runs dry first breaks the stream (its frame cannot end).
        An empty ``header`` sends the pipe's bytes alone (a frame built in the pipe)."""
        async with self._send_lock:
            if header:
                await self._send_locked(memoryview(header), socket.MSG_NOSIGNAL | socket.MSG_MORE)
            while count:
                if self._closed:
                    raise TransportClosed("send: the vchan was closed by this side")
                try:
                    moved = os.splice(pipe_fd, self._fd, count, flags=SPLICE_FLAGS)
                except BlockingIOError:
                    await self._wait_writable()
                    continue
                except OSError as exc:
                    if self._closed:
                        raise TransportClosed("send: the vchan was closed by this side") from exc
                    raise self._broken(exc) from exc
                if not moved:
                    raise TransportBroken("the pipe ran dry inside a frame")
                count -= moved

    async def recv(self, max_bytes: int) -> bytes:
        if max_bytes <= 0:
            raise ValueError(f"recv size must be positive, not {max_bytes}")
        while True:
            if self._closed:
                raise TransportClosed("recv: the vchan was closed by this side")
            try:
                return self._sock.recv(min(max_bytes, RECV_CHUNK_MAX))
            except BlockingIOError:
                await self._wait_readable()
            except ConnectionResetError:
                return b""
            except OSError as exc:
                if self._closed:
                    raise TransportClosed("recv: the vchan was closed by this side") from exc
                raise TransportBroken(f"recv from domain {self._remote_domain}: {exc}") from exc

    def close(self) -> None:
        # Every byte send() accepted is already in the kernel, which still delivers it to a
        # live peer after the close: nothing to flush here.
        if self._closed:
            return
        self._closed = True
        try:
            if self._watching_read:
                self._loop.remove_reader(self._fd)
                self._watching_read = False
            if self._watching_write:
                self._loop.remove_writer(self._fd)
                self._watching_write = False
            _wake(self._read_waiter)
            _wake(self._write_waiter)
            self._sock.close()
        except Exception as exc:  # close must never raise
            log.debug("error while closing a vchan socket: %s", exc)

    async def aclose(self) -> None:
        self.close()


def _wrap(sock: socket.socket, remote_domain: int, port: int) -> AsyncSocketStream:
    try:
        return AsyncSocketStream(sock, remote_domain, port)
    except BaseException:
        sock.close()
        raise


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
        return _wrap(conn, self._remote_domain, self._port)

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
    path: str | os.PathLike[str], remote_domain: int, port: int, timeout: float | None
) -> AsyncSocketStream:
    """Connect to ``path``, retrying with back-off while no server takes the call."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    deadline = None if timeout is None else started + timeout
    delay = CONNECT_RETRY_FIRST
    while True:
        sock = connect_once(path)
        if sock is not None:
            return _wrap(sock, remote_domain, port)
        if loop.time() - started < CONNECT_RETRY_YIELD_FOR:
            # The event loop cannot sleep less than 1 ms (epoll's timeout unit): for the
            # first fraction of a millisecond, retry after one pass of the loop instead.
            await asyncio.sleep(0)
            continue
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
