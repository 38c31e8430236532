"""The asyncio face of the vchan backend.

Integration with the event loop goes through libxenvchan's event-channel fd: the loop
watches it with ``add_reader``; when it is readable we acknowledge the event with
``libxenvchan_wait`` (which then cannot block) and move bytes both ways:

* incoming bytes go to a receive buffer that is refilled from the ring only while it is
  under :data:`RECV_LIMIT` - a slow reader leaves data in the ring, so the peer's writes
  wait (backpressure through the ring itself);
* outgoing bytes wait in a send buffer that ``send`` keeps under :data:`SEND_LIMIT` by
  awaiting until the ring took enough.

A timer checks the peer's liveness while somebody waits, since a dead peer domain sends
no event. Every operation of one stream runs in the loop's thread, so no lock is needed.
Imports asyncio, so only the daemon and agent load it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from qrexec.backends.vchan_ring import CONNECTED, DISCONNECTED, Ring, XenstoreLiveness, vchan_path
from qrexec.backends.xenlibs import XenLibs
from qrexec.backends.xenstore import XenStore
from qrexec.errors import TransportBroken, TransportClosed, TransportError

log = logging.getLogger(__name__)

#: Bytes buffered on each side beyond the ring before the producer has to wait.
RECV_LIMIT = 256 * 1024
SEND_LIMIT = 256 * 1024
#: Largest single read from the ring.
READ_CHUNK = 65536
LIVENESS_INTERVAL = 2.0


class AsyncVchanStream:
    """A connected vchan, asyncio face."""

    def __init__(self, ring: Ring) -> None:
        self._ring = ring
        self._loop = asyncio.get_running_loop()
        self._recv_buf = bytearray()
        self._send_buf = bytearray()
        self._eof = False
        self._broken = False
        self._closed = False  # by us: send/recv refused
        self._ring_closed = False
        self._changed = asyncio.Event()
        self._liveness = XenstoreLiveness()
        self._timer: asyncio.TimerHandle | None = None
        self._loop.add_reader(ring.fd, self._on_event)
        self._pump()

    @property
    def remote_domain(self) -> int:
        return self._ring.remote_domain

    @property
    def port(self) -> int:
        return self._ring.port

    # -- moving bytes (runs in the loop) ---------------------------------------------

    def _on_event(self) -> None:
        if self._ring_closed:
            return
        try:
            self._ring.acknowledge_event()
        except TransportError as exc:
            log.warning("vchan %d/%d: %s", self.remote_domain, self.port, exc)
            self._broken = True  # no more events can be waited for: end both directions
            self._eof = True
        self._pump()

    def _pump(self) -> None:
        """Move what can move now; wake waiters; close for real once flushed."""
        if self._ring_closed:
            return
        ring = self._ring
        while not self._eof and len(self._recv_buf) < RECV_LIMIT:
            got = ring.read(min(READ_CHUNK, RECV_LIMIT - len(self._recv_buf)))
            if got is None:
                self._eof = True
            elif got:
                self._recv_buf += got
            else:
                break
        while self._send_buf and not self._broken:
            written = ring.write(memoryview(self._send_buf))
            if written < 0:
                self._broken = True
            elif written:
                del self._send_buf[:written]
            else:
                break
        # End of stream comes only from read() (the peer closed or died *and* the ring is
        # empty): bytes the peer wrote before closing stay readable after it left.
        if self._send_buf and ring.is_open() == DISCONNECTED:
            self._broken = True
        self._changed.set()
        if self._closed and (not self._send_buf or self._broken):
            self._close_ring()

    def _arm_liveness(self) -> None:
        if self._timer is None and not self._ring_closed:
            self._timer = self._loop.call_later(LIVENESS_INTERVAL, self._check_liveness)

    def _check_liveness(self) -> None:
        self._timer = None
        if self._ring_closed:
            return
        if not self._ring.peer_alive(self._liveness):
            self._broken = True  # sending is over; reading drains the ring, then ends
        self._pump()
        if not self._ring_closed:
            self._arm_liveness()

    async def _wait_change(self) -> None:
        self._changed.clear()
        self._arm_liveness()
        await self._changed.wait()

    # -- API -----------------------------------------------------------------------

    async def send(self, data: bytes | bytearray | memoryview) -> None:
        if self._closed:
            raise TransportClosed("send on a closed vchan")
        if self._broken or self._ring.is_open() == DISCONNECTED:
            raise TransportBroken(f"vchan peer (domain {self.remote_domain}) is gone")
        self._send_buf += memoryview(data).cast("B")
        self._pump()
        while len(self._send_buf) > SEND_LIMIT:
            if self._broken:
                raise TransportBroken(f"vchan peer (domain {self.remote_domain}) is gone")
            if self._closed:
                raise TransportClosed("vchan closed while sending")
            await self._wait_change()
        if self._broken:
            raise TransportBroken(f"vchan peer (domain {self.remote_domain}) is gone")

    async def recv(self, max_bytes: int) -> bytes:
        if max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        while True:
            if self._closed:
                raise TransportClosed("recv on a closed vchan")
            if self._recv_buf:
                chunk = bytes(self._recv_buf[:max_bytes])
                del self._recv_buf[:max_bytes]
                self._pump()  # room again: refill from the ring
                return chunk
            if self._eof:
                return b""
            await self._wait_change()

    async def recv_into(self, buffer: bytearray | memoryview) -> int:
        if len(buffer) <= 0:
            raise ValueError("recv_into needs a non-empty buffer")
        while True:
            if self._closed:
                raise TransportClosed("recv on a closed vchan")
            if self._recv_buf:
                count = min(len(buffer), len(self._recv_buf))
                buffer[:count] = memoryview(self._recv_buf)[:count]
                del self._recv_buf[:count]
                self._pump()  # room again: refill from the ring
                return count
            if self._eof:
                return 0
            if not self._ring_closed:
                # Nothing buffered: take what the ring has straight into the caller's buffer.
                got = self._ring.read_into(buffer)
                if got is None:
                    self._eof = True
                    continue
                if got:
                    self._pump()  # the peer may be waiting for the room we just made
                    return got
            await self._wait_change()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._pump()
            if not self._ring_closed:
                self._arm_liveness()  # a dead peer must not keep the flush pending forever
        except Exception:
            log.exception("vchan close")
            self._close_ring()
        self._changed.set()

    async def aclose(self) -> None:
        self.close()
        while not self._ring_closed:
            await self._wait_change()

    def _close_ring(self) -> None:
        if self._ring_closed:
            return
        self._ring_closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        try:
            self._loop.remove_reader(self._ring.fd)
        except Exception:
            log.debug("remove_reader failed", exc_info=True)
        try:
            self._ring.close()
        except Exception:
            log.exception("libxenvchan_close failed")
        self._liveness.close()
        self._changed.set()


class AsyncVchanListener:
    """A published vchan server waiting for its one client, asyncio face."""

    def __init__(self, ring: Ring) -> None:
        self._ring: Ring | None = ring

    async def accept(self) -> AsyncVchanStream:
        ring = self._ring
        if ring is None:
            raise TransportClosed("accept on a closed vchan listener")
        loop = asyncio.get_running_loop()
        event = asyncio.Event()
        liveness = XenstoreLiveness()

        def on_event() -> None:
            try:
                ring.acknowledge_event()
            finally:
                event.set()

        loop.add_reader(ring.fd, on_event)
        log.debug("vchan server port %d: waiting for domain %d", ring.port, ring.remote_domain)
        try:
            while ring.is_open() != CONNECTED:
                if ring.is_open() == DISCONNECTED or not ring.peer_alive(liveness):
                    raise TransportBroken(
                        f"vchan client domain {ring.remote_domain} is gone (port {ring.port})"
                    )
                event.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), LIVENESS_INTERVAL)
        finally:
            loop.remove_reader(ring.fd)
            liveness.close()
        log.debug("vchan server port %d: domain %d connected", ring.port, ring.remote_domain)
        ring.on_connected()
        self._ring = None
        return AsyncVchanStream(ring)

    def close(self) -> None:
        ring, self._ring = self._ring, None
        if ring is not None:
            try:
                ring.close()
            except Exception:
                log.exception("libxenvchan_close failed")


async def wait_for_server_async(
    libs: XenLibs, own_domain: int, remote_domain: int, port: int, timeout: float | None
) -> None:
    """Wait for the server's ``event-channel`` node on an xenstore watch fd.

    Takes the backend's libraries and domain id rather than the backend, so this face does
    not import :mod:`qrexec.backends.vchan` (which picks this face on first use).
    """
    path = vchan_path(remote_domain, own_domain, port)
    loop = asyncio.get_running_loop()
    fired = asyncio.Event()
    token = f"qrexec-vchan-async-{id(fired)}"
    started = time.monotonic()
    deadline = None if timeout is None else started + timeout
    with XenStore(libs) as xs:
        xs.watch(path, token)
        fd = xs.watch_fd()
        loop.add_reader(fd, fired.set)
        log.debug("vchan client: waiting for %s", path)
        try:
            while not xs.read(f"{path}/event-channel"):
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(
                        f"vchan server in domain {remote_domain} did not appear on port {port}"
                    )
                fired.clear()
                wait = 1.0 if remaining is None else min(1.0, remaining)
                try:
                    await asyncio.wait_for(fired.wait(), wait)
                except TimeoutError:
                    log.debug("vchan client: no watch event for %s within %.1fs", path, wait)
                xs.drain_watch_events()
        finally:
            loop.remove_reader(fd)
            xs.unwatch(path, token)
    log.debug("vchan client: %s ready after %.3fs", path, time.monotonic() - started)
