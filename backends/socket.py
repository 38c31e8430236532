"""Unix-socket emulation of vchan, compatible with Qubes' libvchan-socket (spec §2).

Each vchan is one ``AF_UNIX`` stream socket carrying raw qrexec bytes, with no framing added,
so a real Qubes agent, daemon or client built against libvchan-socket can be our peer.
Our own domain id comes from ``VCHAN_DOMAIN`` (default 0), the directory from
``VCHAN_SOCKET_DIR`` (default ``/var/run/vchan``).

Two layouts, chosen with ``QREXEC_VCHAN_LAYOUT``:

* ``flat`` (default, what libvchan-socket does): domain ``M`` serving remote domain ``D`` on
  port ``P`` unlinks, binds and listens (backlog 1) on ``<dir>/vchan.M.D.P.sock``; the client
  connects to the same name seen from its side, ``vchan.<D>.<own>.<P>.sock``. **In this
  layout the emulation is not a security boundary between emulated domains**: every domain
  needs the whole directory, and a domain id is whatever ``VCHAN_DOMAIN`` says, so any
  process that can reach the directory can open, squat or unlink any emulated vchan.
* ``isolated``: each pair of domains has a directory of its own,
  ``<dir>/pair.<lo>.<hi>/vchan.M.D.P.sock`` (``lo``/``hi`` the two ids in order). A domain
  is given (mounted, in containers) only the pair directories it belongs to, so it cannot
  open or squat a vchan between two other domains; within a pair each side can only disturb
  its own conversation. Real libvchan-socket peers do not know this layout.

The client retries while the socket is absent or refused (the start order does not
matter), with a short capped back-off instead of libvchan-socket's 100 µs busy loop. Each
server takes one connection: after accepting, it closes its listening socket and unlinks
its file (only if the file is still the one it bound), so no second client can get in.

This module is the **blocking** face and never imports asyncio; the asyncio face lives in
:mod:`qrexec.backends.socket_async` and is imported on first use of ``listen_async`` /
``connect_async``. It does not interpret the bytes it moves.
"""

from __future__ import annotations

import _thread
import os
import select
import socket
import time
from collections.abc import Callable, Mapping

from qrexec.backends.defaults import DEFAULT_READ_MIN, DEFAULT_WRITE_MIN
from qrexec.backends.socket_setup import (
    CONNECT_RETRY_FIRST,
    RECV_CHUNK_MAX,
    SEND_BUFFER_SIZE,
    BoundSocket,
    as_path,
    bytes_waiting,
    connect_once,
    next_retry_delay,
)
from qrexec.errors import TransportBroken, TransportClosed, TransportUnavailable
from qrexec.lazy_logging import get_logger

# Neither typing nor pathlib at run time: the per-call clients load this module. Paths are
# strings inside; the accessors that hand out Path objects import pathlib when called.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from pathlib import Path
    from typing import Literal

    from qrexec.backends.socket_async import AsyncSocketListener, AsyncSocketStream

    Layout = Literal["flat", "isolated"]

log = get_logger(__name__)

DOMAIN_ENV = "VCHAN_DOMAIN"
SOCKET_DIR_ENV = "VCHAN_SOCKET_DIR"
LAYOUT_ENV = "QREXEC_VCHAN_LAYOUT"
DEFAULT_SOCKET_DIR = "/var/run/vchan"

LAYOUTS: tuple[Layout, ...] = ("flat", "isolated")

#: Xen domain ids are 16 bits; ids from 0x7FF0 up are reserved (DOMID_FIRST_RESERVED).
MAX_DOMAIN_ID = 0x7FEF
MAX_PORT = 0xFFFF


def check_domain(value: int, what: str = "domain id") -> int:
    """Validate a domain id (a programming error, not untrusted input, when wrong)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_DOMAIN_ID:
        raise ValueError(f"{what} must be an integer in 0..{MAX_DOMAIN_ID}, not {value!r}")
    return value


def check_port(value: int) -> int:
    """Validate a vchan port number."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_PORT:
        raise ValueError(f"vchan port must be an integer in 0..{MAX_PORT}, not {value!r}")
    return value


def socket_file(socket_dir: str, layout: Layout, server: int, client: int, port: int) -> str:
    """Where the server domain ``server`` listens for ``client`` on ``port``."""
    name = f"vchan.{server}.{client}.{port}.sock"
    if layout == "flat":
        return os.path.join(socket_dir, name)
    low, high = sorted((server, client))
    return os.path.join(socket_dir, f"pair.{low}.{high}", name)


def socket_path(
    socket_dir: str | os.PathLike[str], layout: Layout, server: int, client: int, port: int
) -> Path:
    """:func:`socket_file` as a Path."""
    return as_path(socket_file(os.fspath(socket_dir), layout, server, client, port))


class _FdGuard:
    """Lets ``close`` run from any thread while another thread is blocked on the fd.

    Closing an fd does not wake a thread blocked on it (and its number could be reused under
    that thread), so ``close`` only shuts the socket down - which wakes blocked calls - and
    the fd itself is released by whoever leaves last.
    """

    __slots__ = ("_lock", "_release", "_released", "_users", "_wake", "closed")

    def __init__(self, wake: Callable[[], None], release: Callable[[], None]) -> None:
        self._lock = _thread.allocate_lock()
        self._users = 0
        self.closed = False
        self._released = False
        self._wake = wake
        self._release = release

    def enter(self, what: str) -> None:
        with self._lock:
            if self.closed:
                raise TransportClosed(f"{what}: the vchan was closed by this side")
            self._users += 1

    def leave(self) -> None:
        with self._lock:
            self._users -= 1
            release = self.closed and self._users == 0 and not self._released
            if release:
                self._released = True
        if release:
            self._release()

    def close(self) -> bool:
        """Mark closed; return False if it already was."""
        with self._lock:
            if self.closed:
                return False
            self.closed = True
            busy = self._users > 0
            if not busy:
                self._released = True
        try:
            if busy:
                self._wake()
            else:
                self._release()
        except OSError as exc:
            log.debug("ignoring error while closing a vchan socket: %s", exc)
        return True


def _shutdown(sock: socket.socket) -> None:
    # No contextlib.suppress: importing contextlib costs each per-call client ~0.4 ms.
    try:  # noqa: SIM105
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


class SocketStream:
    """A connected emulated vchan, blocking face (:class:`~qrexec.backends.base.BlockingStream`).

    One thread may send while another receives; ``close`` may come from any thread.
    """

    def __init__(self, sock: socket.socket, remote_domain: int, port: int) -> None:
        sock.setblocking(True)
        # As the asyncio face: a bulk writer sleeps in the kernel every ~1 MiB rather than
        # every ~200 KiB, and so wakes its reader less often (best effort).
        try:  # noqa: SIM105 - contextlib costs each per-call client ~0.4 ms to import
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_SIZE)
        except OSError:
            pass
        self._sock = sock
        self._remote_domain = remote_domain
        self._port = port
        self._guard = _FdGuard(lambda: _shutdown(sock), sock.close)

    @property
    def remote_domain(self) -> int:
        return self._remote_domain

    @property
    def port(self) -> int:
        return self._port

    def __repr__(self) -> str:
        return f"<SocketStream remote={self._remote_domain} port={self._port}>"

    def send(self, data: bytes | bytearray | memoryview) -> None:
        self._guard.enter("send")
        try:
            self._sock.sendall(data, socket.MSG_NOSIGNAL)
        except OSError as exc:
            if self._guard.closed:
                raise TransportClosed("send: the vchan was closed by this side") from exc
            raise TransportBroken(
                f"send: peer domain {self._remote_domain} port {self._port} is gone ({exc})"
            ) from exc
        finally:
            self._guard.leave()

    def recv(self, max_bytes: int) -> bytes:
        if max_bytes <= 0:
            raise ValueError(f"recv size must be positive, not {max_bytes}")
        self._guard.enter("recv")
        try:
            data = self._sock.recv(min(max_bytes, RECV_CHUNK_MAX))
        except ConnectionResetError:
            # The peer closed with bytes of ours unread: for vchan that is just "gone".
            data = b""
        except OSError as exc:
            if self._guard.closed:
                raise TransportClosed("recv: the vchan was closed by this side") from exc
            raise TransportBroken(f"recv from domain {self._remote_domain}: {exc}") from exc
        finally:
            self._guard.leave()
        if not data and self._guard.closed:
            raise TransportClosed("recv: the vchan was closed by this side")
        return data

    def splice_from(self, header: bytes | bytearray | memoryview, pipe_fd: int, count: int) -> None:
        """Send ``header``, then ``count`` bytes moved by the kernel from the pipe ``pipe_fd``
        (Linux ``splice``): the payload never passes through user space, and on kernels
        where unix sockets take spliced pages it is not copied at all.

        The ``count`` bytes must already be in the pipe (``FIONREAD``) and nobody else may
        read it; a pipe that runs dry first breaks the stream (its frame cannot be ended).
        An empty ``header`` sends the pipe's bytes alone (a frame built in the pipe).
        """
        self._guard.enter("send")
        try:
            if header:
                self._sock.sendall(header, socket.MSG_NOSIGNAL | socket.MSG_MORE)
            out = self._sock.fileno()
            while count:
                moved = os.splice(pipe_fd, out, count)
                if not moved:
                    raise TransportBroken("the input pipe ran dry inside a frame")
                count -= moved
        except OSError as exc:
            if self._guard.closed:
                raise TransportClosed("send: the vchan was closed by this side") from exc
            raise TransportBroken(
                f"send: peer domain {self._remote_domain} port {self._port} is gone ({exc})"
            ) from exc
        finally:
            self._guard.leave()

    def splice_into(self, pipe_fd: int, count: int) -> int:
        """Move 1..``count`` received bytes into the pipe ``pipe_fd`` (Linux ``splice``: page
        references handed over, no copy through user space); 0 at end of stream.

        Blocks until there are bytes, as :meth:`recv_into`. Raises
        :class:`BlockingIOError` when bytes wait but the pipe cannot take any (out of room
        or out of slots, as after a peer sending tiny pieces): the caller empties it and
        takes the bytes another way. Never blocks on the pipe, never spins.
        """
        flags = getattr(os, "SPLICE_F_NONBLOCK", 0) | getattr(os, "SPLICE_F_MOVE", 0)
        self._guard.enter("recv")
        try:
            fd = self._sock.fileno()
            while True:
                try:
                    count = os.splice(fd, pipe_fd, count, flags=flags)
                    break
                except BlockingIOError:
                    if bytes_waiting(fd):
                        raise
                    poller = select.poll()
                    poller.register(fd, select.POLLIN)
                    poller.poll()
        except BlockingIOError:
            raise
        except ConnectionResetError:
            count = 0
        except OSError as exc:
            if self._guard.closed:
                raise TransportClosed("recv: the vchan was closed by this side") from exc
            raise TransportBroken(f"recv from domain {self._remote_domain}: {exc}") from exc
        finally:
            self._guard.leave()
        if not count and self._guard.closed:
            raise TransportClosed("recv: the vchan was closed by this side")
        return count

    def recv_into(self, buffer: bytearray | memoryview) -> int:
        """Fill the start of ``buffer`` with 1..len(buffer) bytes; 0 at end of stream.

        Like :meth:`recv`, but the bytes go from the kernel straight into ``buffer``.
        """
        if len(buffer) <= 0:
            raise ValueError("recv_into needs a non-empty buffer")
        self._guard.enter("recv")
        try:
            count = self._sock.recv_into(buffer)
        except ConnectionResetError:
            count = 0
        except OSError as exc:
            if self._guard.closed:
                raise TransportClosed("recv: the vchan was closed by this side") from exc
            raise TransportBroken(f"recv from domain {self._remote_domain}: {exc}") from exc
        finally:
            self._guard.leave()
        if not count and self._guard.closed:
            raise TransportClosed("recv: the vchan was closed by this side")
        return count

    def close(self) -> None:
        self._guard.close()


class SocketListener:
    """A server waiting for its one client, blocking face."""

    def __init__(self, bound: BoundSocket, remote_domain: int, port: int) -> None:
        bound.sock.setblocking(False)
        self._bound = bound
        self._remote_domain = remote_domain
        self._port = port
        self._guard = _FdGuard(self._wake, bound.sock.close)

    def _wake(self) -> None:
        # shutdown() on a listening AF_UNIX socket wakes poll() with POLLHUP.
        _shutdown(self._bound.sock)

    @property
    def path(self) -> Path:
        return self._bound.path

    def accept(self, timeout: float | None = None) -> SocketStream:
        deadline = None if timeout is None else time.monotonic() + timeout
        self._guard.enter("accept")
        try:
            poller = select.poll()
            poller.register(self._bound.sock, select.POLLIN)
            while True:
                if self._guard.closed:
                    raise TransportClosed("accept: the listener was closed")
                try:
                    conn, _ = self._bound.sock.accept()
                    break
                except BlockingIOError:
                    pass
                if deadline is None:
                    poller.poll()
                else:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise TimeoutError(
                            f"no client from domain {self._remote_domain} on vchan port "
                            f"{self._port} within {timeout} s"
                        )
                    poller.poll(max(1, int(remaining * 1000 + 0.999)))
        finally:
            self._guard.leave()
        # One connection per server: nobody else may connect to this name.
        self.close()
        return SocketStream(conn, self._remote_domain, self._port)

    def close(self) -> None:
        if self._guard.close():
            self._bound.unlink_if_ours()


class SocketBackend:
    """The unix-socket transport bound to our own domain id (see the module docstring)."""

    name = "socket"

    def __init__(
        self, own_domain: int, socket_dir: str | os.PathLike[str], layout: Layout = "flat"
    ) -> None:
        if layout not in LAYOUTS:
            raise ValueError(f"unknown vchan socket layout {layout!r}; use one of {LAYOUTS}")
        self._own_domain = check_domain(own_domain, "own domain id")
        self._socket_dir = os.fspath(socket_dir)
        self.layout: Layout = layout

    @property
    def socket_dir(self) -> Path:
        return as_path(self._socket_dir)

    @property
    def own_domain(self) -> int:
        return self._own_domain

    def __repr__(self) -> str:
        return (
            f"<SocketBackend own={self._own_domain} dir={str(self.socket_dir)!r} "
            f"layout={self.layout}>"
        )

    def server_file(self, remote_domain: int, port: int) -> str:
        """The socket file we listen on when serving ``remote_domain`` on ``port``."""
        return socket_file(
            self._socket_dir,
            self.layout,
            self._own_domain,
            check_domain(remote_domain),
            check_port(port),
        )

    def client_file(self, remote_domain: int, port: int) -> str:
        """The socket file we connect to as client of ``remote_domain`` on ``port``."""
        return socket_file(
            self._socket_dir,
            self.layout,
            check_domain(remote_domain),
            self._own_domain,
            check_port(port),
        )

    def server_path(self, remote_domain: int, port: int) -> Path:
        """:meth:`server_file` as a Path."""
        return as_path(self.server_file(remote_domain, port))

    def client_path(self, remote_domain: int, port: int) -> Path:
        """:meth:`client_file` as a Path."""
        return as_path(self.client_file(remote_domain, port))

    def listen(
        self,
        remote_domain: int,
        port: int,
        *,
        read_min: int = DEFAULT_READ_MIN,
        write_min: int = DEFAULT_WRITE_MIN,
    ) -> SocketListener:
        # Ring sizes have no meaning here: the kernel's socket buffers play the rings.
        bound = BoundSocket(self.server_file(remote_domain, port))
        return SocketListener(bound, remote_domain, port)

    def connect(
        self, remote_domain: int, port: int, *, timeout: float | None = None
    ) -> SocketStream:
        path = self.client_file(remote_domain, port)
        started = time.monotonic()
        deadline = None if timeout is None else started + timeout
        delay = CONNECT_RETRY_FIRST
        while True:
            sock = connect_once(path)
            if sock is not None:
                return SocketStream(sock, remote_domain, port)
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(
                        f"no vchan server of domain {remote_domain} port {port} "
                        f"appeared within {timeout} s ({path})"
                    )
                time.sleep(min(delay, remaining))
            else:
                time.sleep(delay)
            delay = next_retry_delay(delay, time.monotonic() - started)

    async def listen_async(
        self,
        remote_domain: int,
        port: int,
        *,
        read_min: int = DEFAULT_READ_MIN,
        write_min: int = DEFAULT_WRITE_MIN,
    ) -> AsyncSocketListener:
        from qrexec.backends.socket_async import AsyncSocketListener

        bound = BoundSocket(self.server_file(remote_domain, port))
        return AsyncSocketListener(bound, remote_domain, port)

    async def connect_async(
        self, remote_domain: int, port: int, *, timeout: float | None = None
    ) -> AsyncSocketStream:
        from qrexec.backends.socket_async import connect

        return await connect(self.client_file(remote_domain, port), remote_domain, port, timeout)


def make_backend(env: Mapping[str, str]) -> SocketBackend:
    """Build the backend from ``VCHAN_DOMAIN``, ``VCHAN_SOCKET_DIR`` and ``QREXEC_VCHAN_LAYOUT``."""
    raw_domain = env.get(DOMAIN_ENV) or "0"
    try:
        own = check_domain(int(raw_domain, 10), DOMAIN_ENV)
    except ValueError as exc:
        raise TransportUnavailable(
            f"{DOMAIN_ENV}={raw_domain!r} is not a domain id (0..{MAX_DOMAIN_ID})"
        ) from exc
    layout = env.get(LAYOUT_ENV) or "flat"
    if layout not in LAYOUTS:
        raise TransportUnavailable(
            f"{LAYOUT_ENV}={layout!r} is not a vchan socket layout; use one of {', '.join(LAYOUTS)}"
        )
    socket_dir = env.get(SOCKET_DIR_ENV) or DEFAULT_SOCKET_DIR
    return SocketBackend(own, socket_dir, layout)
