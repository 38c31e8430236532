"""In-process transport for unit tests: every "domain" lives in this process.

A :class:`MemoryHub` stands for the hypervisor: ``hub.backend(domain_id)`` gives the backend
of one emulated domain, and its vchans are pairs of bounded in-memory pipes. Both faces are
offered and may be mixed freely - a thread using the blocking face can talk to a task using
the asyncio face, even on another thread's event loop - because every pipe is guarded by a
lock and wakes blocked threads (condition variable) and waiting tasks (futures, resolved
thread-safely) alike.

``MemoryHub(lockstep=True)`` removes buffering: a ``send`` completes only once the peer has
received every byte of it. Protocol code that only works because the transport buffers
(both sides sending before either receives) deadlocks there, which is the point: such
code would deadlock on a real vchan whose ring is full. ``hub.kill_domain(d)`` simulates a
domain dying: its peers read what was already sent, then end of stream, and their sends
fail with :class:`~qrexec.errors.TransportBroken`.

Does no I/O. asyncio is imported only by the asyncio face.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from qrexec.backends.base import DEFAULT_READ_MIN, DEFAULT_WRITE_MIN
from qrexec.errors import TransportBroken, TransportClosed

if TYPE_CHECKING:
    import asyncio

T = TypeVar("T")

#: Bytes a pipe holds before ``send`` waits (a vchan ring of the default size).
DEFAULT_BUFFER_SIZE = 65536


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class _Waitable:
    """A lock with waiters of both kinds: blocking threads and asyncio tasks.

    ``step`` functions run with the lock held and return None for "not yet"; any other
    value (or an exception) ends the wait. Whoever changes state calls :meth:`notify`.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._cond = threading.Condition(self.lock)
        self._futures: list[tuple[Any, asyncio.Future[None], int]] = []

    def notify(self) -> None:
        """Wake every waiter; call with the lock held."""
        self._cond.notify_all()
        futures, self._futures = self._futures, []
        me = threading.get_ident()
        for loop, future, thread in futures:
            if thread == me:
                _resolve(future)
                continue
            # RuntimeError: that loop is closed, so nobody is waiting any more.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_resolve, future)

    def run_blocking(self, step: Callable[[], T | None], timeout: float | None, what: str) -> T:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.lock:
            while True:
                result = step()
                if result is not None:
                    return result
                if deadline is None:
                    self._cond.wait()
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"{what}: timed out after {timeout} s")
                self._cond.wait(remaining)

    async def run_async(self, step: Callable[[], T | None]) -> T:
        import asyncio

        loop = asyncio.get_running_loop()
        while True:
            with self.lock:
                result = step()
                if result is not None:
                    return result
                future: asyncio.Future[None] = loop.create_future()
                self._futures.append((loop, future, threading.get_ident()))
            await future


class _Pipe(_Waitable):
    """One direction of a vchan: a bounded buffer between one writer and one reader."""

    def __init__(self, capacity: int, lockstep: bool) -> None:
        super().__init__()
        self.capacity = capacity
        self.lockstep = lockstep
        self.buf = bytearray()
        self.produced = 0
        self.consumed = 0
        self.writer_gone = False  # reader sees EOF once the buffer is drained
        self.reader_gone = False  # writer's sends fail


class _SendProgress:
    __slots__ = ("offset", "view", "wait_for")

    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        self.view = memoryview(data).cast("B")
        self.offset = 0
        self.wait_for: int | None = None


class _Endpoint:
    """One side of a connected in-memory vchan, shared by both faces."""

    def __init__(
        self, hub: MemoryHub, own: int, remote: int, port: int, pipe_in: _Pipe, pipe_out: _Pipe
    ) -> None:
        self.hub = hub
        self.own = own
        self.remote_domain = remote
        self.port = port
        self.pipe_in = pipe_in
        self.pipe_out = pipe_out
        self.closed = False
        self.dead = False

    def check(self, what: str) -> None:
        if self.dead:
            raise TransportBroken(f"{what}: domain {self.own} was killed")
        if self.closed:
            raise TransportClosed(f"{what}: the vchan was closed by this side")

    def send_step(self, progress: _SendProgress) -> bool | None:
        pipe = self.pipe_out
        view = progress.view
        while True:
            self.check("send")
            if progress.wait_for is not None:
                if pipe.consumed < progress.wait_for:
                    if pipe.reader_gone:
                        raise TransportBroken(f"send: domain {self.remote_domain} is gone")
                    return None
                progress.wait_for = None
            if progress.offset >= len(view):
                return True
            if pipe.reader_gone:
                raise TransportBroken(f"send: domain {self.remote_domain} is gone")
            space = pipe.capacity - len(pipe.buf)
            if space <= 0:
                return None
            count = min(space, len(view) - progress.offset)
            pipe.buf += view[progress.offset : progress.offset + count]
            progress.offset += count
            pipe.produced += count
            if pipe.lockstep:
                progress.wait_for = pipe.produced
            pipe.notify()

    def recv_step(self, max_bytes: int) -> bytes | None:
        pipe = self.pipe_in
        self.check("recv")
        if pipe.buf:
            count = min(max_bytes, len(pipe.buf))
            data = bytes(pipe.buf[:count])
            del pipe.buf[:count]
            pipe.consumed += count
            pipe.notify()
            return data
        if pipe.writer_gone:
            return b""
        return None

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        with self.pipe_out.lock:
            self.pipe_out.writer_gone = True
            self.pipe_out.notify()
        with self.pipe_in.lock:
            self.pipe_in.reader_gone = True
            self.pipe_in.buf.clear()
            self.pipe_in.notify()
        self.hub._forget(self)

    def kill(self) -> None:
        # close() wakes our own blocked calls too; they see ``dead`` and fail as broken.
        self.dead = True
        self.close()


def _check_size(max_bytes: int) -> None:
    if max_bytes <= 0:
        raise ValueError(f"recv size must be positive, not {max_bytes}")


class MemoryStream:
    """Blocking face of an in-memory vchan."""

    def __init__(self, endpoint: _Endpoint) -> None:
        self._ep = endpoint

    @property
    def remote_domain(self) -> int:
        return self._ep.remote_domain

    @property
    def port(self) -> int:
        return self._ep.port

    def send(self, data: bytes | bytearray | memoryview) -> None:
        progress = _SendProgress(data)
        self._ep.pipe_out.run_blocking(lambda: self._ep.send_step(progress), None, "send")

    def recv(self, max_bytes: int) -> bytes:
        _check_size(max_bytes)
        return self._ep.pipe_in.run_blocking(lambda: self._ep.recv_step(max_bytes), None, "recv")

    def recv_into(self, buffer: bytearray | memoryview) -> int:
        data = self.recv(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self._ep.close()


class AsyncMemoryStream:
    """asyncio face of an in-memory vchan."""

    def __init__(self, endpoint: _Endpoint) -> None:
        self._ep = endpoint

    @property
    def remote_domain(self) -> int:
        return self._ep.remote_domain

    @property
    def port(self) -> int:
        return self._ep.port

    async def send(self, data: bytes | bytearray | memoryview) -> None:
        progress = _SendProgress(data)
        await self._ep.pipe_out.run_async(lambda: self._ep.send_step(progress))

    async def recv(self, max_bytes: int) -> bytes:
        _check_size(max_bytes)
        return await self._ep.pipe_in.run_async(lambda: self._ep.recv_step(max_bytes))

    async def recv_into(self, buffer: bytearray | memoryview) -> int:
        data = await self.recv(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self._ep.close()

    async def aclose(self) -> None:
        # Accepted bytes sit in the pipe, where the peer can still read them.
        self._ep.close()


class _ListenerCore:
    """A server waiting for its one client; the hub hands it the server endpoint."""

    def __init__(self, hub: MemoryHub, key: tuple[int, int, int]) -> None:
        self.hub = hub
        self.key = key
        self.pending: _Endpoint | None = None
        self.taken = False
        self.closed = False

    def accept_step(self) -> _Endpoint | None:
        if self.closed:
            raise TransportClosed("accept: the listener was closed")
        if self.pending is not None:
            endpoint, self.pending = self.pending, None
            self.closed = True
            return endpoint
        return None

    def close(self) -> None:
        with self.hub.lock:
            if self.closed:
                return
            self.closed = True
            if self.hub._listeners.get(self.key) is self:
                del self.hub._listeners[self.key]
            pending, self.pending = self.pending, None
            self.hub.notify()
        if pending is not None:
            pending.close()


class MemoryListener:
    """Blocking face of an in-memory vchan server."""

    def __init__(self, core: _ListenerCore) -> None:
        self._core = core

    def accept(self, timeout: float | None = None) -> MemoryStream:
        endpoint = self._core.hub.run_blocking(self._core.accept_step, timeout, "accept")
        return MemoryStream(endpoint)

    def close(self) -> None:
        self._core.close()


class AsyncMemoryListener:
    """asyncio face of an in-memory vchan server."""

    def __init__(self, core: _ListenerCore) -> None:
        self._core = core

    async def accept(self) -> AsyncMemoryStream:
        endpoint = await self._core.hub.run_async(self._core.accept_step)
        return AsyncMemoryStream(endpoint)

    def close(self) -> None:
        self._core.close()


class MemoryHub(_Waitable):
    """The emulated hypervisor connecting the memory backends of one process."""

    def __init__(self, *, lockstep: bool = False, buffer_size: int = DEFAULT_BUFFER_SIZE) -> None:
        super().__init__()
        if buffer_size <= 0:
            raise ValueError(f"buffer_size must be positive, not {buffer_size}")
        self.lockstep = lockstep
        self.buffer_size = buffer_size
        self._listeners: dict[tuple[int, int, int], _ListenerCore] = {}
        self._endpoints: dict[int, set[_Endpoint]] = {}

    def backend(self, domain_id: int) -> MemoryBackend:
        """The backend of emulated domain ``domain_id``."""
        return MemoryBackend(self, domain_id)

    def kill_domain(self, domain_id: int) -> None:
        """Simulate the death of a domain: its vchans break and its listeners close.

        The domain may be "restarted" afterwards by simply using its backend again.
        """
        with self.lock:
            listeners = [core for key, core in self._listeners.items() if key[0] == domain_id]
            endpoints = list(self._endpoints.get(domain_id, ()))
        for core in listeners:
            core.close()
        for endpoint in endpoints:
            endpoint.kill()

    def _listen(self, own: int, remote: int, port: int) -> _ListenerCore:
        key = (own, remote, port)
        core = _ListenerCore(self, key)
        with self.lock:
            # As with a unix socket re-bound under the same name, the newer server wins.
            self._listeners[key] = core
            self.notify()
        return core

    def _connect_step(self, own: int, remote: int, port: int) -> _Endpoint | None:
        core = self._listeners.get((remote, own, port))
        if core is None or core.closed or core.taken:
            return None
        del self._listeners[core.key]
        core.taken = True
        to_server = _Pipe(self.buffer_size, self.lockstep)
        to_client = _Pipe(self.buffer_size, self.lockstep)
        server = _Endpoint(self, remote, own, port, to_server, to_client)
        client = _Endpoint(self, own, remote, port, to_client, to_server)
        self._endpoints.setdefault(remote, set()).add(server)
        self._endpoints.setdefault(own, set()).add(client)
        core.pending = server
        self.notify()
        return client

    def _forget(self, endpoint: _Endpoint) -> None:
        with self.lock:
            self._endpoints.get(endpoint.own, set()).discard(endpoint)


class MemoryBackend:
    """The in-memory transport of one emulated domain (see :class:`MemoryHub`)."""

    name = "memory"

    def __init__(self, hub: MemoryHub, own_domain: int) -> None:
        self.hub = hub
        self._own_domain = own_domain

    @property
    def own_domain(self) -> int:
        return self._own_domain

    def __repr__(self) -> str:
        return f"<MemoryBackend own={self._own_domain} lockstep={self.hub.lockstep}>"

    def _connect_step(self, remote_domain: int, port: int) -> Callable[[], _Endpoint | None]:
        return lambda: self.hub._connect_step(self._own_domain, remote_domain, port)

    def listen(
        self,
        remote_domain: int,
        port: int,
        *,
        read_min: int = DEFAULT_READ_MIN,
        write_min: int = DEFAULT_WRITE_MIN,
    ) -> MemoryListener:
        return MemoryListener(self.hub._listen(self._own_domain, remote_domain, port))

    def connect(
        self, remote_domain: int, port: int, *, timeout: float | None = None
    ) -> MemoryStream:
        endpoint = self.hub.run_blocking(
            self._connect_step(remote_domain, port),
            timeout,
            f"connect to domain {remote_domain} port {port}",
        )
        return MemoryStream(endpoint)

    async def listen_async(
        self,
        remote_domain: int,
        port: int,
        *,
        read_min: int = DEFAULT_READ_MIN,
        write_min: int = DEFAULT_WRITE_MIN,
    ) -> AsyncMemoryListener:
        return AsyncMemoryListener(self.hub._listen(self._own_domain, remote_domain, port))

    async def connect_async(
        self, remote_domain: int, port: int, *, timeout: float | None = None
    ) -> AsyncMemoryStream:
        import asyncio

        async with asyncio.timeout(timeout):
            endpoint = await self.hub.run_async(self._connect_step(remote_domain, port))
        return AsyncMemoryStream(endpoint)
