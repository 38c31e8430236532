"""The transport interface every backend implements (vchan, unix-socket emulation, memory).

A transport is what libvchan gives qrexec: a reliable, ordered byte stream between this
domain and one remote domain, identified by ``(remote_domain, port)``. One side is the
*server* (it must know the client's domain id), the other the *client*, which waits for the
server to appear. Each server takes exactly one connection.

There are two faces over the same backends:

* the **blocking** face, for the per-call clients (``qrexec-client``, ``qrexec-client-vm``)
  that start once per call and must not import asyncio. ``send`` and ``recv`` may be used
  concurrently from two threads (one sending, one receiving); backends that need it
  serialise internally.
* the **asyncio** face, for the long-running agent and daemon. Implementations use
  callback protocols with pause/resume flow control, not asyncio streams (measured 3-5x
  slower on bulk data here).

Semantics shared by both faces (the conformance suite in ``tests/conformance`` checks them):

* ``send`` moves all of ``data`` or raises; it waits while the peer's buffer is full, so
  memory stays bounded whatever the peer's speed (backpressure).
* ``recv(n)`` returns between 1 and ``n`` bytes, waiting for at least one; it returns
  ``b""`` once the peer has closed (or died) and every byte it sent has been read. There
  is no half-close: vchan has none, so end-of-stream of one direction lives only in the
  protocol's zero-length DATA messages.
* ``close`` always closes, is idempotent and never raises. Bytes already accepted by
  ``send`` are still delivered to a live peer. After it, ``send``/``recv`` raise
  :class:`~qrexec.errors.TransportClosed`.
* ``send`` to a peer that closed or died raises :class:`~qrexec.errors.TransportBroken`.
* Listeners and connectors wait: a server waits for a client that comes late, a client
  retries while the server is absent. Timeouts raise :class:`TimeoutError`.

This module does no I/O; it only declares types (``typing.Protocol``), so implementations
need not inherit from anything.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from qrexec.backends.defaults import DEFAULT_READ_MIN, DEFAULT_WRITE_MIN

__all__ = [
    "DEFAULT_READ_MIN",
    "DEFAULT_WRITE_MIN",
    "AsyncListener",
    "AsyncStream",
    "Backend",
    "BlockingListener",
    "BlockingStream",
]


@runtime_checkable
class BlockingStream(Protocol):
    """One connected vchan, blocking face."""

    @property
    def remote_domain(self) -> int:
        """Domain id of the peer."""
        ...

    @property
    def port(self) -> int:
        """The vchan port this stream was set up on."""
        ...

    def send(self, data: bytes | bytearray | memoryview) -> None:
        """Send every byte of ``data``, waiting for buffer space as needed."""
        ...

    def recv(self, max_bytes: int) -> bytes:
        """Return 1..max_bytes bytes, or ``b""`` at end of stream."""
        ...

    def recv_into(self, buffer: bytearray | memoryview) -> int:
        """Like ``recv(len(buffer))`` into the start of ``buffer``: 1..len(buffer), 0 at end.

        The bulk paths use it with one preallocated buffer; backends that can fill it
        without an intermediate ``bytes`` do so.
        """
        ...

    def close(self) -> None:
        """Close; idempotent, never raises."""
        ...


@runtime_checkable
class BlockingListener(Protocol):
    """A vchan server waiting for its one client, blocking face."""

    def accept(self, timeout: float | None = None) -> BlockingStream:
        """Wait for the client and return the connected stream."""
        ...

    def close(self) -> None:
        """Stop listening (removes the socket file / xenstore node); never raises."""
        ...


@runtime_checkable
class AsyncStream(Protocol):
    """One connected vchan, asyncio face."""

    @property
    def remote_domain(self) -> int: ...

    @property
    def port(self) -> int: ...

    async def send(self, data: bytes | bytearray | memoryview) -> None:
        """Queue all of ``data``; returns once the backend's buffer is under its limit."""
        ...

    async def recv(self, max_bytes: int) -> bytes:
        """Return 1..max_bytes bytes, or ``b""`` at end of stream."""
        ...

    async def recv_into(self, buffer: bytearray | memoryview) -> int:
        """Like ``recv(len(buffer))`` into the start of ``buffer``: 1..len(buffer), 0 at end."""
        ...

    def close(self) -> None:
        """Close now; bytes already accepted are still flushed. Never raises."""
        ...

    async def aclose(self) -> None:
        """Flush what ``send`` accepted, then close. Always closes, never raises."""
        ...


@runtime_checkable
class AsyncListener(Protocol):
    """A vchan server waiting for its one client, asyncio face."""

    async def accept(self) -> AsyncStream: ...

    def close(self) -> None: ...


@runtime_checkable
class Backend(Protocol):
    """A transport backend bound to our own domain.

    The asyncio methods import asyncio lazily, so a blocking user of a backend never
    imports it.
    """

    name: str

    @property
    def own_domain(self) -> int:
        """Our own domain id (``VCHAN_DOMAIN`` for the socket backend, xenstore on Xen)."""
        ...

    def listen(
        self,
        remote_domain: int,
        port: int,
        *,
        read_min: int = DEFAULT_READ_MIN,
        write_min: int = DEFAULT_WRITE_MIN,
    ) -> BlockingListener:
        """Become the server of ``(remote_domain, port)`` (libvchan ``server_init``)."""
        ...

    def connect(
        self, remote_domain: int, port: int, *, timeout: float | None = None
    ) -> BlockingStream:
        """Connect as client, waiting for the server to appear (``client_init``)."""
        ...

    async def listen_async(
        self,
        remote_domain: int,
        port: int,
        *,
        read_min: int = DEFAULT_READ_MIN,
        write_min: int = DEFAULT_WRITE_MIN,
    ) -> AsyncListener: ...

    async def connect_async(
        self, remote_domain: int, port: int, *, timeout: float | None = None
    ) -> AsyncStream: ...
