"""Unix socket addresses for paths longer than a ``sockaddr_un`` holds.

Deep socket folders (test and testbed run folders, domain roots) give socket paths past the
107 bytes of ``sun_path``. :func:`unix_address` then opens the folder and names the socket
through ``/proc/self/fd/<folder fd>/<name>``, which the kernel resolves to the same file, for
both ``bind`` and ``connect``. Every program uses this one helper (the per-call clients
included: it imports no asyncio).

Does not create, bind or connect anything itself.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator

#: Longest path a sockaddr_un holds (108 bytes with the NUL).
MAX_UNIX_PATH = 107


@contextlib.contextmanager
def unix_address(path: str | os.PathLike[str]) -> Iterator[str]:
    """An ``AF_UNIX`` address for ``path``, valid inside the ``with`` block.

    A short path is itself. A long one opens its folder (``O_PATH``: search permission is
    all a plain path needs, too) for the duration of the block; :class:`OSError` when the
    folder cannot be opened (``FileNotFoundError`` when it does not exist) or the file name
    alone is too long even that way (``ENAMETOOLONG``).
    """
    text = os.fspath(path)
    if len(os.fsencode(text)) <= MAX_UNIX_PATH:
        yield text
        return
    folder, name = os.path.split(text)
    fd = os.open(folder or ".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        address = f"/proc/self/fd/{fd}/{name}"
        if len(os.fsencode(address)) > MAX_UNIX_PATH:
            raise OSError(errno.ENAMETOOLONG, "socket name too long for AF_UNIX", name)
        yield address
    finally:
        os.close(fd)
