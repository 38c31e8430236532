"""The Xen vchan backend: Qubes' transport over the real libxenvchan, through cffi.

Behaves as Qubes' vchan-xen does, so that a C agent or daemon can be the peer:

* a server publishes ``/local/domain/<self>/data/vchan/<client>/<port>`` (libxenvchan's
  own ``ring-ref`` / ``event-channel`` nodes) and withdraws it once its client connected;
* a client waits until the server's ``event-channel`` node is non-empty - on an xenstore
  watch, never by spinning - then maps the rings;
* connecting to ourselves (loopback) is refused, as libvchan-xen refuses it;
* ring sizes are what the caller asks (control vchan 4096/4096, data 64 KiB), rounded up
  to a power of two by libxenvchan;
* a peer that closed reads as end of stream; a peer whose domain died is detected by the
  event channel's status and also reads as end of stream / raises TransportBroken on send.

This module holds the backend and its **blocking** face; the asyncio face is in
:mod:`qrexec.backends.vchan_async` and is imported only when used (the per-call clients
must not import asyncio). The blocking face is safe for one sending and one receiving
thread: every libxenvchan call happens under one lock, and only one thread at a time
consumes the (shared) event channel, waking the other through a condition - so no
wakeup is lost.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import threading
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING

from qrexec.backends import xenlibs
from qrexec.backends.base import DEFAULT_READ_MIN, DEFAULT_WRITE_MIN
from qrexec.backends.vchan_ring import (
    CONNECTED,
    DISCONNECTED,
    Ring,
    XenstoreLiveness,
    vchan_path,
)
from qrexec.backends.xenstore import XenStore
from qrexec.errors import TransportBroken, TransportClosed, TransportError

if TYPE_CHECKING:
    from qrexec.backends.vchan_async import AsyncVchanListener, AsyncVchanStream

log = logging.getLogger(__name__)

#: How often a waiter checks that the remote domain is still alive (vchan-xen: 10 s).
LIVENESS_INTERVAL = 2.0
#: A client re-reads the server's node at least this often, in case a watch is lost.
NODE_RECHECK_INTERVAL = 1.0


class _Waiter:
    """Serialises ring calls and shares event-channel wakeups between threads.

    Exactly one thread at a time (the *pumper*) selects on the event fd and acknowledges
    the event with libxenvchan_wait; it then bumps ``generation`` and wakes the others,
    who re-check their condition. Events that arrive while nobody selects stay pending
    on the fd, so none is lost.
    """

    def __init__(self, ring: Ring) -> None:
        self.ring = ring
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self.generation = 0
        self.pumping = False
        self.closing = False
        self._wake_r, self._wake_w = os.pipe()
        self._liveness = XenstoreLiveness()
        self._last_liveness = time.monotonic()

    def wait_event(self, deadline: float | None) -> None:
        """Called with the lock held: return after an event, a timeout slice or close."""
        if self.pumping:
            self.cond.wait(_slice(deadline))
            return
        self.pumping = True
        self.lock.release()
        try:
            readable, _, _ = select.select([self.ring.fd, self._wake_r], [], [], _slice(deadline))
        finally:
            self.lock.acquire()
            self.pumping = False
        try:
            if self.ring.fd in readable and not self.ring.closed:
                self.ring.acknowledge_event()
            now = time.monotonic()
            if not readable or now - self._last_liveness >= LIVENESS_INTERVAL:
                self._last_liveness = now
                if not self.ring.closed:
                    self.ring.peer_alive(self._liveness)
        finally:
            self.generation += 1
            self.cond.notify_all()

    def interrupt(self) -> None:
        """Wake the pumper (used by close); never raises."""
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def dispose(self) -> None:
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._liveness.close()


def _slice(deadline: float | None) -> float:
    if deadline is None:
        return LIVENESS_INTERVAL
    return max(0.0, min(LIVENESS_INTERVAL, deadline - time.monotonic()))


class VchanStream:
    """A connected vchan, blocking face."""

    def __init__(self, ring: Ring) -> None:
        self._ring = ring
        self._waiter = _Waiter(ring)
        self._closed = False

    @property
    def remote_domain(self) -> int:
        return self._ring.remote_domain

    @property
    def port(self) -> int:
        return self._ring.port

    def send(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        w = self._waiter
        with w.lock:
            while view:
                if self._closed:
                    raise TransportClosed("send on a closed vchan")
                written = self._ring.write(view)
                if written < 0 or self._ring.is_open() == DISCONNECTED:
                    raise TransportBroken(
                        f"vchan peer (domain {self.remote_domain}, port {self.port}) is gone"
                    )
                if written:
                    view = view[written:]
                    continue
                w.wait_event(None)

    def recv(self, max_bytes: int) -> bytes:
        if max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        w = self._waiter
        with w.lock:
            while True:
                if self._closed:
                    raise TransportClosed("recv on a closed vchan")
                got = self._ring.read(max_bytes)
                if got is None:
                    return b""
                if got:
                    return got
                w.wait_event(None)

    def recv_into(self, buffer: bytearray | memoryview) -> int:
        # From the ring straight into the caller's buffer: the one copy vchan needs.
        if len(buffer) <= 0:
            raise ValueError("recv_into needs a non-empty buffer")
        w = self._waiter
        with w.lock:
            while True:
                if self._closed:
                    raise TransportClosed("recv on a closed vchan")
                got = self._ring.read_into(buffer)
                if got is None:
                    return 0
                if got:
                    return got
                w.wait_event(None)

    def close(self) -> None:
        w = self._waiter
        with w.lock:
            if self._closed:
                return
            self._closed = True
            w.closing = True
            w.interrupt()
            while w.pumping:
                w.cond.wait(0.5)
            try:
                self._ring.close()
            except Exception:  # close never raises, whatever the library did
                log.exception("libxenvchan_close failed")
        w.dispose()


class VchanListener:
    """A published vchan server waiting for its one client, blocking face."""

    def __init__(self, ring: Ring) -> None:
        self._ring: Ring | None = ring

    def accept(self, timeout: float | None = None) -> VchanStream:
        ring = self._ring
        if ring is None:
            raise TransportClosed("accept on a closed vchan listener")
        deadline = None if timeout is None else time.monotonic() + timeout
        waiter = _Waiter(ring)
        try:
            with waiter.lock:
                while ring.is_open() != CONNECTED:
                    if ring.is_open() == DISCONNECTED:
                        raise TransportBroken(
                            f"vchan client domain {ring.remote_domain} is gone (port {ring.port})"
                        )
                    if deadline is not None and time.monotonic() >= deadline:
                        raise TimeoutError(
                            f"no vchan client from domain {ring.remote_domain} on port "
                            f"{ring.port} within {timeout} s"
                        )
                    waiter.wait_event(deadline)
        finally:
            waiter.dispose()
        ring.on_connected()
        self._ring = None
        return VchanStream(ring)

    def close(self) -> None:
        ring, self._ring = self._ring, None
        if ring is not None:
            try:
                ring.close()
            except Exception:
                log.exception("libxenvchan_close failed")


class VchanBackend:
    """The vchan transport bound to this Xen domain."""

    name = "vchan"

    def __init__(self, own_domain: int | None = None, libs: xenlibs.XenLibs | None = None) -> None:
        self._libs = libs or xenlibs.load()
        if own_domain is None:
            with XenStore(self._libs) as xs:
                own_domain = xs.own_domid()
        self._own_domain = own_domain

    @property
    def own_domain(self) -> int:
        return self._own_domain

    @property
    def libs(self) -> xenlibs.XenLibs:
        return self._libs

    def _check_remote(self, remote_domain: int, port: int) -> None:
        if remote_domain == self._own_domain:
            raise TransportError(
                f"vchan loopback refused: domain {remote_domain} is ourselves (port {port})"
            )
        if not 0 <= remote_domain <= 0x7FEF:
            raise TransportError(f"invalid vchan remote domain id {remote_domain}")
        if not 0 <= port <= 0xFFFFFFFF:
            raise TransportError(f"invalid vchan port {port}")

    # -- blocking face -------------------------------------------------------------

    def listen(
        self,
        remote_domain: int,
        port: int,
        *,
        read_min: int = DEFAULT_READ_MIN,
        write_min: int = DEFAULT_WRITE_MIN,
    ) -> VchanListener:
        self._check_remote(remote_domain, port)
        ring = Ring.server(self._libs, self._own_domain, remote_domain, port, read_min, write_min)
        return VchanListener(ring)

    def connect(
        self, remote_domain: int, port: int, *, timeout: float | None = None
    ) -> VchanStream:
        self._check_remote(remote_domain, port)
        deadline = None if timeout is None else time.monotonic() + timeout
        self.wait_for_server(remote_domain, port, deadline)
        return VchanStream(Ring.client(self._libs, self._own_domain, remote_domain, port))

    def wait_for_server(self, remote_domain: int, port: int, deadline: float | None) -> None:
        """Block until the server's ``event-channel`` node is non-empty (xenstore watch)."""
        path = vchan_path(remote_domain, self._own_domain, port)
        token = f"qrexec-vchan-{os.getpid()}-{threading.get_ident()}"
        with XenStore(self._libs) as xs:
            xs.watch(path, token)
            log.debug("vchan client: waiting for %s", path)
            try:
                fd = xs.watch_fd()
                while not xs.read(f"{path}/event-channel"):
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        raise TimeoutError(
                            f"vchan server in domain {remote_domain} did not appear on port {port}"
                        )
                    wait = (
                        NODE_RECHECK_INTERVAL
                        if remaining is None
                        else min(NODE_RECHECK_INTERVAL, remaining)
                    )
                    select.select([fd], [], [], wait)
                    xs.drain_watch_events()
            finally:
                xs.unwatch(path, token)

    # -- asyncio face (imported lazily) ----------------------------------------------

    async def listen_async(
        self,
        remote_domain: int,
        port: int,
        *,
        read_min: int = DEFAULT_READ_MIN,
        write_min: int = DEFAULT_WRITE_MIN,
    ) -> AsyncVchanListener:
        from qrexec.backends.vchan_async import AsyncVchanListener

        self._check_remote(remote_domain, port)
        ring = Ring.server(self._libs, self._own_domain, remote_domain, port, read_min, write_min)
        return AsyncVchanListener(ring)

    async def connect_async(
        self, remote_domain: int, port: int, *, timeout: float | None = None
    ) -> AsyncVchanStream:
        from qrexec.backends.vchan_async import AsyncVchanStream, wait_for_server_async

        self._check_remote(remote_domain, port)
        await wait_for_server_async(self.libs, self.own_domain, remote_domain, port, timeout)
        ring = Ring.client(self._libs, self._own_domain, remote_domain, port)
        return AsyncVchanStream(ring)


def make_backend(env: Mapping[str, str]) -> VchanBackend:
    """Build the backend for this domain: own id from xenstore (``domid``).

    ``env`` is accepted for the common backend signature; the Xen backend has no
    settings of its own besides the library overrides read by :mod:`xenlibs`.
    """
    del env
    return VchanBackend()
