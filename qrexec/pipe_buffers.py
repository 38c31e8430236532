"""Larger kernel buffers on the pipes and sockets a bulk stream passes through.

A pipe holds 64 KiB by default, so a stream through it costs a read, a write and a
wake-up of each side every 64 KiB; qrexec's frames are 64 KiB too, and our relays read
several frames per system call when the pipe has them. Asking for 1 MiB (Linux
``F_SETPIPE_SZ``, capped by ``/proc/sys/fs/pipe-max-size``; a socket's ``SO_SNDBUF`` is
capped by ``net.core.wmem_max``) divides those round trips. Best effort: where the call is
refused (another system, the user's pipe quota spent, not a pipe) nothing changes but
speed. Used by the client (no asyncio) and the service relay alike; does nothing else.
``fcntl`` (a shared library) is loaded on the first call, not at import: a per-call client
with a few bytes of input never pays for it.
"""

from __future__ import annotations

import os
import socket
import stat

#: Bytes asked for: a few frames of the largest size (65536 + header) per round trip.
BULK_BUFFER_SIZE = 1 << 20


def enlarge_pipe(fd: int, size: int = BULK_BUFFER_SIZE) -> None:
    """Grow the pipe behind ``fd`` to ``size`` bytes if it is a smaller pipe (best effort)."""
    import fcntl

    set_size = getattr(fcntl, "F_SETPIPE_SZ", None)
    get_size = getattr(fcntl, "F_GETPIPE_SZ", None)
    if set_size is None or get_size is None:
        return
    try:
        if stat.S_ISFIFO(os.fstat(fd).st_mode) and fcntl.fcntl(fd, get_size) < size:
            fcntl.fcntl(fd, set_size, size)
    except OSError:
        pass


def enlarge_send_buffer(sock: socket.socket, size: int = BULK_BUFFER_SIZE) -> None:
    """Ask for a ``size``-byte kernel send buffer on ``sock`` (best effort)."""
    # No contextlib.suppress: importing contextlib costs each per-call client ~0.4 ms.
    try:  # noqa: SIM105
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)
    except OSError:
        pass
