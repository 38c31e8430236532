"""The socket backend's connection setup, shared by its blocking and asyncio faces.

Binding a listening socket at a vchan path and trying one connect, with the retry
back-off both faces use. Lives apart from :mod:`qrexec.backends.socket` (the blocking face
and the backend object) and :mod:`qrexec.backends.socket_async` (the asyncio face) so that
each face imports this base and neither imports the other. Never imports asyncio; moves no
data.
"""

from __future__ import annotations

import errno
import os
import socket
import stat

from qrexec.errors import TransportUnavailable
from qrexec.unix_address import UnixAddress

# No pathlib at run time (the per-call clients load this module): paths are strings inside.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from pathlib import Path


def as_path(text: str) -> Path:
    """``text`` as a Path, importing pathlib only when someone asks for one."""
    from pathlib import Path

    return Path(text)


#: Client retry back-off: start short, double, cap so that a long wait costs a few wake-ups
#: per second, not a busy loop. The common early connect (an agent told of a port a few
#: dozen microseconds before the dom0 caller has bound it) finds the server within 0.1 ms,
#: so the first pauses are that short: a 1 ms first pause cost those calls a whole
#: millisecond; the doubling reaches the old 1 ms step after five tries.
CONNECT_RETRY_FIRST = 0.00005
CONNECT_RETRY_MAX = 0.05
#: An asyncio client retries after one pass of its event loop (no sleep) for this long
#: first, as the loop's shortest sleep is 1 ms: a bounded spin of at most 0.2 ms per connect.
CONNECT_RETRY_YIELD_FOR = 0.0002
#: Kernel send buffer asked for each stream, both faces (capped by ``net.core.wmem_max``).
#: A writer that finds the buffer full sleeps (or, asyncio, takes a loop round trip) and
#: wakes its reader: with the default ~200 KiB that is every ~100 KiB, with 1 MiB five
#: times less often. The bytes sit in kernel memory, bounded per stream, as a ring's do.
SEND_BUFFER_SIZE = 1 << 20
#: Upper bound for one ``recv``: asking the kernel for a huge size would allocate it first.
RECV_CHUNK_MAX = 256 * 1024
#: After this long without a server the wait is a long one (a caller that never listens,
#: or a hostile peer naming unserved ports): back off further, to a cap of 1 s, so that
#: hundreds of such waits cost next to no CPU.
CONNECT_RETRY_SLOW_AFTER = 2.0
CONNECT_RETRY_SLOW_MAX = 1.0
#: Errors meaning "no server yet": no file, stale file / no listener, backlog full.
RETRY_ERRNOS = frozenset({errno.ENOENT, errno.ECONNREFUSED, errno.EAGAIN})


class _addressable(UnixAddress):
    """An AF_UNIX address for ``path``, even when it is longer than ``sun_path`` allows
    (:func:`qrexec.unix_address.unix_address`), with its failures as transport errors."""

    __slots__ = ()

    def __enter__(self) -> str:
        try:
            return super().__enter__()
        except FileNotFoundError:
            raise  # no directory yet: a connecting client keeps waiting
        except OSError as exc:
            path = self._path
            if exc.errno == errno.ENAMETOOLONG:
                raise TransportUnavailable(
                    f"vchan socket name too long for AF_UNIX: {os.path.basename(path)}"
                ) from exc
            raise TransportUnavailable(
                f"cannot open vchan socket directory {os.path.dirname(path)}: {exc}"
            ) from exc


class BoundSocket:
    """A listening socket bound at a vchan path, shared by both faces' listeners."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        path = os.fspath(path)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            # No contextlib.suppress: importing contextlib costs each per-call client ~0.4 ms.
            try:  # noqa: SIM105
                os.unlink(path)
            except FileNotFoundError:
                pass
            with _addressable(path) as address:
                sock.bind(address)
            info = os.stat(path)
            sock.listen(1)
        except BaseException:
            sock.close()
            raise
        self.sock = sock
        self.file = path
        self._identity = (info.st_dev, info.st_ino)

    @property
    def path(self) -> Path:
        return as_path(self.file)

    def unlink_if_ours(self) -> None:
        """Remove the socket file unless someone else has bound the name since."""
        try:
            info = os.lstat(self.file)
            if stat.S_ISSOCK(info.st_mode) and (info.st_dev, info.st_ino) == self._identity:
                os.unlink(self.file)
        except OSError:
            pass


def connect_once(path: str | os.PathLike[str]) -> socket.socket | None:
    """Try to connect to ``path``; None while there is no server to take the call."""
    path = os.fspath(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        # AF_UNIX connects complete at once: success, or an error (EAGAIN if backlog is full).
        with _addressable(path) as address:
            sock.connect(address)
    except OSError as exc:
        sock.close()
        if exc.errno in RETRY_ERRNOS:
            return None
        raise TransportUnavailable(f"cannot connect to vchan socket {path}: {exc}") from exc
    except BaseException:
        sock.close()
        raise
    return sock


def bytes_waiting(fd: int) -> int:
    """Bytes in a socket's receive queue (``FIONREAD``), 0 if it cannot be asked. Only the
    splice paths ask, so ``fcntl``/``termios`` load then, not at a client's start."""
    import fcntl
    import sys
    import termios

    size = bytearray(4)
    try:
        fcntl.ioctl(fd, termios.FIONREAD, size)
    except OSError:
        return 0
    return int.from_bytes(size, sys.byteorder)


def next_retry_delay(delay: float, waited: float = 0.0) -> float:
    """The next pause of a connect retry loop that has waited ``waited`` seconds so far."""
    cap = CONNECT_RETRY_MAX if waited < CONNECT_RETRY_SLOW_AFTER else CONNECT_RETRY_SLOW_MAX
    return min(delay * 2, cap)
