"""What the conformance suite runs against: backend pairs and the two faces.

A *pair* is two backends of two different domains that can reach each other: ``a`` (domain
``a.own_domain``) and ``b``. Every test runs once per registered pair and per face.

To run the suite against another backend, register a factory here (or, from outside the
tree, name it in ``QREXEC_CONFORMANCE_PAIRS=module:function[,module:function...]``; the
function takes the test's private directory and returns a context manager yielding a
:class:`BackendPair`). A pair whose two domains cannot live in one process may still run
the process-based tests by giving ``peer_env`` (the environment under which
``tests/conformance/transport_peer.py`` acts as domain ``b`` through ``load_backend``).

The asyncio face is driven from plain test threads: :class:`AsyncioFace` runs an event loop
in a thread of its own and every call is a coroutine scheduled on it, so one test body
checks both faces with identical expectations.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import importlib
import os
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from transport_peer import pattern_blocks

from qrexec.backends.base import AsyncListener, AsyncStream, Backend
from qrexec.backends.memory import MemoryHub
from qrexec.backends.socket import SocketBackend

T = TypeVar("T")

DOMAIN_A = 1
DOMAIN_B = 2
#: How long one step may hang before a test fails instead of hanging.
STEP_TIMEOUT = 60.0


@dataclass
class BackendPair:
    """Two domains that can talk; see the module docstring."""

    a: Backend
    b: Backend
    #: Environment making ``transport_peer.py`` act as domain ``b`` (None: in-process only).
    peer_env: dict[str, str] | None = None
    #: Simulates the death of domain ``b`` in-process (None: only real process death).
    kill_b: Callable[[], None] | None = None
    #: Upper bound of bytes ``send`` may accept while the peer reads nothing.
    max_buffered: int = 16 * 1024 * 1024
    extra: dict[str, Any] = field(default_factory=dict)


PairFactory = Callable[[Path], contextlib.AbstractContextManager[BackendPair]]


@contextlib.contextmanager
def _socket_pair(directory: Path, layout: str) -> Iterator[BackendPair]:
    assert layout in ("flat", "isolated")
    a = SocketBackend(DOMAIN_A, directory, layout)  # type: ignore[arg-type]
    b = SocketBackend(DOMAIN_B, directory, layout)  # type: ignore[arg-type]
    env = {
        "QREXEC_TRANSPORT": "socket",
        "VCHAN_DOMAIN": str(DOMAIN_B),
        "VCHAN_SOCKET_DIR": str(directory),
        "QREXEC_VCHAN_LAYOUT": layout,
    }
    yield BackendPair(a, b, peer_env=env)


@contextlib.contextmanager
def _memory_pair(directory: Path, lockstep: bool) -> Iterator[BackendPair]:
    hub = MemoryHub(lockstep=lockstep)
    yield BackendPair(
        hub.backend(DOMAIN_A),
        hub.backend(DOMAIN_B),
        kill_b=lambda: hub.kill_domain(DOMAIN_B),
        max_buffered=hub.buffer_size,
    )


PAIR_FACTORIES: dict[str, PairFactory] = {
    "socket-flat": lambda d: _socket_pair(d, "flat"),
    "socket-isolated": lambda d: _socket_pair(d, "isolated"),
    "memory": lambda d: _memory_pair(d, lockstep=False),
    "memory-lockstep": lambda d: _memory_pair(d, lockstep=True),
}


def _load_external_factories() -> None:
    for spec in filter(None, os.environ.get("QREXEC_CONFORMANCE_PAIRS", "").split(",")):
        module_name, _, function = spec.partition(":")
        factory = getattr(importlib.import_module(module_name), function)
        PAIR_FACTORIES[spec] = factory


_load_external_factories()


# --- faces -------------------------------------------------------------------------------


class Stream(Protocol):
    """The blocking calls a test makes, whatever face is underneath."""

    def send(self, data: bytes | bytearray | memoryview) -> None: ...
    def recv(self, max_bytes: int) -> bytes: ...
    def recv_into(self, buffer: bytearray | memoryview) -> int: ...
    def close(self) -> None: ...
    @property
    def remote_domain(self) -> int: ...
    @property
    def port(self) -> int: ...


class Listener(Protocol):
    def accept(self, timeout: float | None = None) -> Stream: ...
    def close(self) -> None: ...


class Face(Protocol):
    name: str

    def listen(self, backend: Backend, remote: int, port: int) -> Listener: ...
    def connect(
        self, backend: Backend, remote: int, port: int, timeout: float | None = None
    ) -> Stream: ...
    def shutdown(self) -> None: ...


class BlockingFace:
    name = "blocking"

    def listen(self, backend: Backend, remote: int, port: int) -> Listener:
        return backend.listen(remote, port)

    def connect(
        self, backend: Backend, remote: int, port: int, timeout: float | None = None
    ) -> Stream:
        return backend.connect(remote, port, timeout=timeout)

    def shutdown(self) -> None:
        pass


class AsyncioFace:
    """Runs the asyncio face on a private loop thread, callable from any test thread."""

    name = "asyncio"

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def submit(self, coro: Coroutine[Any, Any, T]) -> Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def call(self, function: Callable[[], T]) -> T:
        async def call() -> T:
            return function()

        return self.run(call())

    def listen(self, backend: Backend, remote: int, port: int) -> Listener:
        return _AsyncListenerAdapter(self, self.run(backend.listen_async(remote, port)))

    def connect(
        self, backend: Backend, remote: int, port: int, timeout: float | None = None
    ) -> Stream:
        return _AsyncStreamAdapter(
            self, self.run(backend.connect_async(remote, port, timeout=timeout))
        )

    def shutdown(self) -> None:
        async def cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        self.run(cancel_all())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


class _AsyncListenerAdapter:
    def __init__(self, face: AsyncioFace, listener: AsyncListener) -> None:
        self._face = face
        self._listener = listener

    def accept(self, timeout: float | None = None) -> Stream:
        async def accept() -> AsyncStream:
            async with asyncio.timeout(timeout):
                return await self._listener.accept()

        return _AsyncStreamAdapter(self._face, self._face.run(accept()))

    def close(self) -> None:
        self._face.call(self._listener.close)


class _AsyncStreamAdapter:
    def __init__(self, face: AsyncioFace, stream: AsyncStream) -> None:
        self._face = face
        self.stream = stream

    @property
    def remote_domain(self) -> int:
        return self.stream.remote_domain

    @property
    def port(self) -> int:
        return self.stream.port

    def send(self, data: bytes | bytearray | memoryview) -> None:
        self._face.run(self.stream.send(data))

    def recv(self, max_bytes: int) -> bytes:
        return self._face.run(self.stream.recv(max_bytes))

    def recv_into(self, buffer: bytearray | memoryview) -> int:
        return self._face.run(self.stream.recv_into(buffer))

    def close(self) -> None:
        self._face.call(self.stream.close)

    def aclose(self) -> None:
        self._face.run(self.stream.aclose())


FACES: dict[str, Callable[[], Face]] = {"blocking": BlockingFace, "asyncio": AsyncioFace}


# --- helpers for test bodies ---------------------------------------------------------------


def in_thread(function: Callable[[], T]) -> Future[T]:
    """Run ``function`` in a daemon thread; its result or exception lands in the future."""
    future: Future[T] = Future()

    def run() -> None:
        try:
            future.set_result(function())
        except BaseException as exc:
            future.set_exception(exc)

    threading.Thread(target=run, daemon=True).start()
    return future


def pattern(size: int, seed: int = 0) -> bytes:
    """Deterministic bytes that differ per offset, so loss, reorder and duplication show."""
    block = bytes((i * 31 + seed * 7 + (i >> 8)) & 0xFF for i in range(4093))
    repeats = size // len(block) + 1
    return (block * repeats)[:size]


def recv_exactly(stream: Stream, size: int, chunk: int = 65536) -> bytes:
    parts = bytearray()
    while len(parts) < size:
        data = stream.recv(min(chunk, size - len(parts)))
        if not data:
            raise AssertionError(f"end of stream after {len(parts)} of {size} bytes")
        parts += data
    return bytes(parts)


def recv_until_eof(stream: Stream, chunk: int = 65536) -> bytes:
    parts = bytearray()
    while data := stream.recv(chunk):
        parts += data
    return bytes(parts)


def pattern_sha256(total: int, seed: int) -> str:
    digest = hashlib.sha256()
    for chunk in pattern_blocks(total, seed):
        digest.update(chunk)
    return digest.hexdigest()


def send_pattern(stream: Stream, total: int, seed: int, chunk: int = 1 << 20) -> None:
    for block in pattern_blocks(total, seed):
        for offset in range(0, len(block), chunk):
            stream.send(block[offset : offset + chunk])


def hash_exactly(stream: Stream, total: int) -> str:
    digest = hashlib.sha256()
    received = 0
    while received < total:
        data = stream.recv(min(65536, total - received))
        assert data, f"end of stream after {received} of {total} bytes"
        digest.update(data)
        received += len(data)
    return digest.hexdigest()


def wait_until_stalled(progress: Callable[[], int]) -> int:
    """Wait until a counter stops moving (the sender is blocked); return its value."""
    deadline = time.monotonic() + STEP_TIMEOUT
    last = progress()
    while time.monotonic() < deadline:
        time.sleep(0.3)
        now = progress()
        if now == last:
            return now
        last = now
    raise AssertionError(f"sender never blocked; it got {last} bytes accepted by a non-reader")
