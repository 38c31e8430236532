"""Listening unix sockets that a peer cannot exhaust (the rule in ``docs/decisions.md``).

Used by every long-lived listener of ours that untrusted or numerous peers reach: the
agent's trigger socket, the daemon's client socket, the policy daemon's sockets. Three
guards, none of which the asyncio server has:

* **an idle cap**: at most ``max_idle`` connections that have not yet sent a complete
  request; when a new one arrives beyond it, the *oldest* idle one is dropped (a flood of
  silent connections pushes out its own oldest members, never a caller that has already
  spoken). A handler says "my request is complete" with :func:`request_complete`;
* **descriptor exhaustion** (EMFILE/ENFILE/ENOBUFS/ENOMEM on ``accept``) pauses accepting
  for :data:`ACCEPT_PAUSE` seconds after dropping the oldest idle connection, with one
  rate-limited warning instead of asyncio's traceback per attempt;
* **the kernel's maximum backlog** (:func:`listen_backlog`, ``net.core.somaxconn``) so that
  a burst of legitimate clients waits in the kernel instead of being refused.

Does no protocol work: handlers read, decide and answer as with ``asyncio.start_unix_server``.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import errno
import grp
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Final

log = logging.getLogger(__name__)

ConnectionHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]

#: How long accepting pauses after the process (or the system) ran out of descriptors.
ACCEPT_PAUSE: Final = 0.1
#: Shortest time between two warnings of one kind from one server.
WARNING_INTERVAL: Final = 60.0
#: A connection is idle-dropped only once it has been idle this long: a burst of honest
#: clients that connected together gets the time to send its requests.
MIN_IDLE_AGE: Final = 0.5
#: ``accept`` errors that mean "out of a resource", not "this client failed".
RESOURCE_ERRNOS: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
#: ``accept`` errors about one client only (it went away before we took it).
CLIENT_ERRNOS: Final = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM})
SOMAXCONN_PATH: Final = "/proc/sys/net/core/somaxconn"
#: Group given to dom0's sockets (spec §8), when it exists.
SOCKET_GROUP: Final = "qubes"

_current: contextvars.ContextVar[tuple[GuardedServer, asyncio.Task[None]] | None] = (
    contextvars.ContextVar("qrexec_guarded_connection", default=None)
)


def listen_backlog() -> int:
    """The kernel's maximum listen backlog (``listen`` silently truncates to it anyway)."""
    try:
        with open(SOMAXCONN_PATH, encoding="ascii") as f:
            value = int(f.read().strip())
    except (OSError, ValueError):
        return socket.SOMAXCONN
    return max(value, 1)


def restrict_socket(path: str, *, dir_fd: int | None = None) -> None:
    """Mode 0660 and group ``qubes`` (when that group exists) for a socket file.

    Called on the temporary name, before the socket is renamed into place, so that nobody
    ever sees it with the umask's mode.
    """
    os.chmod(path, 0o660, dir_fd=dir_fd)
    try:
        gid = grp.getgrnam(SOCKET_GROUP).gr_gid
    except KeyError:
        return
    try:
        os.chown(path, -1, gid, dir_fd=dir_fd)
    except PermissionError:
        log.warning("%s: cannot give the socket to group %s", path, SOCKET_GROUP)


def request_complete() -> None:
    """Called by a handler once its peer sent a whole request: it is no longer idle.

    Outside a :class:`GuardedServer` connection this does nothing, so shared handlers
    (the policy services) can call it unconditionally.
    """
    current = _current.get()
    if current is not None:
        server, task = current
        server.mark_busy(task)


class RateLimitedWarning:
    """A warning logged at most once per ``interval``; the next one counts the skipped."""

    def __init__(self, logger: logging.Logger, interval: float = WARNING_INTERVAL) -> None:
        self.logger = logger
        self.interval = interval
        self._last: float | None = None
        self._skipped = 0

    def warning(self, message: str, *args: object) -> None:
        now = time.monotonic()
        if self._last is not None and now - self._last < self.interval:
            self._skipped += 1
            return
        if self._skipped:
            message += f" ({self._skipped} more since the last warning)"
        self._last = now
        self._skipped = 0
        self.logger.warning(message, *args)


class GuardedServer:
    """Accepts on a listening unix socket and runs ``handler`` per connection, guarded.

    ``sock`` must already be bound and listening (see :func:`listen_backlog`); the server
    owns it from :meth:`start` on and closes it in :meth:`close`.
    """

    def __init__(
        self,
        sock: socket.socket,
        handler: ConnectionHandler,
        *,
        what: str,
        max_idle: int,
        limit: int = 65536,
    ) -> None:
        if max_idle < 1:
            raise ValueError(f"max_idle must be at least 1, not {max_idle}")
        self.sock = sock
        self.handler = handler
        self.what = what
        self.max_idle = max_idle
        self.limit = limit
        #: Connections without a complete request -> when accepted; oldest first.
        self._idle: dict[asyncio.Task[None], float] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._accepting: asyncio.Task[None] | None = None
        self._exhausted = RateLimitedWarning(log)
        self._dropped = RateLimitedWarning(log)
        self.idle_dropped = 0
        self.accept_pauses = 0

    @property
    def idle(self) -> int:
        return len(self._idle)

    @property
    def connections(self) -> int:
        return len(self._tasks)

    def start(self) -> None:
        self.sock.setblocking(False)
        self._accepting = asyncio.ensure_future(self._accept_loop())

    def close(self) -> None:
        """Stop accepting and close the listening socket; connections go on."""
        if self._accepting is not None:
            self._accepting.cancel()
        if self.sock.fileno() >= 0:
            with contextlib.suppress(ValueError, OSError, RuntimeError):
                asyncio.get_running_loop().remove_reader(self.sock.fileno())
        self.sock.close()

    async def wait_closed(self) -> None:
        """Wait until the accepting task has ended (after :meth:`close`)."""
        if self._accepting is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._accepting

    def abort_connections(self) -> None:
        """Cancel every connection's handler (each closes its socket on the way out)."""
        for task in list(self._tasks):
            task.cancel()

    async def aclose(self) -> None:
        """:meth:`close`, then end every connection and wait for them."""
        self.close()
        tasks = list(self._tasks)
        self.abort_connections()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    def mark_busy(self, task: asyncio.Task[None]) -> None:
        self._idle.pop(task, None)

    # ---- accepting ----

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        accepted = 0
        while True:
            if len(self._idle) >= self.max_idle:
                oldest_age = loop.time() - next(iter(self._idle.values()))
                if oldest_age < MIN_IDLE_AGE:
                    # Let the kernel's backlog hold newcomers until the oldest idle
                    # connection is old enough to be dropped (or has spoken).
                    await asyncio.sleep(MIN_IDLE_AGE - oldest_age)
                    continue
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                await _readable(loop, self.sock)
                continue
            except OSError as exc:
                if exc.errno in RESOURCE_ERRNOS:
                    self.accept_pauses += 1
                    self._exhausted.warning(
                        "%s: cannot accept (%s); pausing %.1f s with %d connection(s) open",
                        self.what,
                        exc.strerror,
                        ACCEPT_PAUSE,
                        len(self._tasks),
                    )
                    self._drop_oldest_idle()
                    await asyncio.sleep(ACCEPT_PAUSE)
                    continue
                if exc.errno in CLIENT_ERRNOS:
                    continue
                log.error("%s: accepting failed, no more connections: %s", self.what, exc)
                return
            self._admit(conn)
            accepted += 1
            if accepted % 32 == 0:
                # A flood of connections must not starve the handlers already running.
                await asyncio.sleep(0)

    def _admit(self, conn: socket.socket) -> None:
        conn.setblocking(False)
        if len(self._idle) >= self.max_idle:
            self._drop_oldest_idle()
        task = asyncio.ensure_future(self._run(conn))
        self._tasks.add(task)
        self._idle[task] = asyncio.get_running_loop().time()
        task.add_done_callback(self._forget)

    def _drop_oldest_idle(self) -> None:
        if not self._idle:
            return
        oldest = next(iter(self._idle))
        del self._idle[oldest]
        oldest.cancel()
        self.idle_dropped += 1
        self._dropped.warning(
            "%s: dropping the oldest connection that has not sent a request "
            "(%d idle at most; %d dropped so far)",
            self.what,
            self.max_idle,
            self.idle_dropped,
        )

    def _forget(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._idle.pop(task, None)

    async def _run(self, conn: socket.socket) -> None:
        task = asyncio.current_task()
        assert task is not None
        _current.set((self, task))
        try:
            reader, writer = await asyncio.open_unix_connection(sock=conn, limit=self.limit)
        except OSError as exc:
            conn.close()
            log.debug("%s: connection lost at once: %s", self.what, exc)
            return
        except BaseException:
            conn.close()
            raise
        try:
            await self.handler(reader, writer)
        except asyncio.CancelledError:
            pass
        except Exception:
            log.exception("%s: internal error while serving a connection", self.what)
        finally:
            writer.close()


async def _readable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    waiter: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not waiter.done():
            waiter.set_result(None)

    fd = sock.fileno()
    loop.add_reader(fd, ready)
    try:
        await waiter
    finally:
        # After GuardedServer.close() the number may already belong to another file,
        # whose reader must stay (close() removed ours before closing the socket).
        if sock.fileno() == fd:
            loop.remove_reader(fd)
