"""Unix socket addresses for paths longer than a ``sockaddr_un`` holds.

Deep socket folders (test and testbed run folders, domain roots) give socket paths past the
107 bytes of ``sun_path``. :func:`unix_address` then opens the folder and names the socket
through ``/proc/self/fd/<folder fd>/<name>``, which the kernel resolves to the same file, for
both ``bind`` and ``connect``. Every program uses this one helper (the per-call clients
included: it imports no asyncio, and no ``contextlib`` either - a class is the context
manager, which spares a per-call client that module's start-up cost).

Does not create, bind or connect anything itself.
"""

from __future__ import annotations

import errno
import os

#: Longest path a sockaddr_un holds (108 bytes with the NUL).
MAX_UNIX_PATH = 107


class UnixAddress:
    """Context manager behind :func:`unix_address`: the address, and the folder fd to close."""

    __slots__ = ("_fd", "_path")

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._path = os.fspath(path)
        self._fd: int | None = None

    def __enter__(self) -> str:
        text = self._path
        if len(os.fsencode(text)) <= MAX_UNIX_PATH:
            return text
        folder, name = os.path.split(text)
        fd = os.open(folder or ".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        address = f"/proc/self/fd/{fd}/{name}"
        if len(os.fsencode(address)) > MAX_UNIX_PATH:
            os.close(fd)
            raise OSError(errno.ENAMETOOLONG, "socket name too long for AF_UNIX", name)
        self._fd = fd
        return address

    def __exit__(self, *exc_info: object) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)


def unix_address(path: str | os.PathLike[str]) -> UnixAddress:
    """An ``AF_UNIX`` address for ``path``, valid inside the ``with`` block.

    A short path is itself. A long one opens its folder (``O_PATH``: search permission is
    all a plain path needs, too) for the duration of the block; :class:`OSError` when the
    folder cannot be opened (``FileNotFoundError`` when it does not exist) or the file name
    alone is too long even that way (``ENAMETOOLONG``).
    """
    return UnixAddress(path)
