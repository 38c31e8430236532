"""Whether this system's ``splice`` works on the descriptors qrexec splices between.

The zero-copy bulk paths (:mod:`qrexec.services.splicing`, the caller's in
:mod:`qrexec.client.caller`) move bytes socket -> pipe and pipe -> socket with
``os.splice``. Linux has done both for unix sockets for many years, but a sandbox or an
emulated kernel (gVisor, for one) may refuse with ``EINVAL``/``ENOSYS``/``EOPNOTSUPP``,
and that must mean "copy instead", decided before any byte of a call has moved. So the
first caller that asks tries one byte each way on a throwaway socketpair and pipe, and
the answer is kept for the life of the process. Imports nothing beyond ``os`` and
``socket`` (the per-call clients load this module only when output turns bulk).
"""

from __future__ import annotations

import os
import socket

_works: bool | None = None


def splice_works() -> bool:
    """True when ``os.splice`` moves bytes unix socket -> pipe -> unix socket here."""
    global _works
    if _works is None:
        _works = _probe()
    return _works


def forget() -> None:
    """Ask again next time (for tests that take splice away)."""
    global _works
    _works = None


def _probe() -> bool:
    splice = getattr(os, "splice", None)
    if splice is None:
        return False
    left, right = socket.socketpair()
    read_end, write_end = os.pipe()
    try:
        left.sendall(b"x")
        if splice(right.fileno(), write_end, 1) != 1:
            return False
        if splice(read_end, left.fileno(), 1) != 1:
            return False
        return right.recv(1) == b"x"
    except OSError:
        return False
    finally:
        left.close()
        right.close()
        os.close(read_end)
        os.close(write_end)
