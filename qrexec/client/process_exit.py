"""How a per-call client process ends: flush Python's own buffers, then ``os._exit``.

A normal interpreter exit tears everything down: a last full garbage collection over every
object the imports made, then each module's dictionary cleared one by one. For a process
that made one call and is about to vanish that is pure cost - about 2.5 ms of a ~20 ms
``qrexec-client`` call here (``bench/bench_calls.py``) - so the programs skip it, as a C
program's ``exit`` would. What the teardown would have done that matters is done first:
``sys.stdout``/``sys.stderr`` are flushed, and a failed flush gives exit status 120, as
CPython's own exit does. The client writes its data with ``os.write`` straight to the
descriptors and registers no ``atexit`` handlers, so nothing else is left behind.

Used only where the program runs as a process (the installed scripts, ``python -m``),
never from :func:`main` itself: tests and Python callers keep their interpreter.
"""

from __future__ import annotations

import os
import sys

#: CPython's exit status when flushing the standard streams fails at exit.
FLUSH_FAILED_EXIT = 120


def exit_now(code: int) -> None:
    """Flush the standard streams and end the process with ``code`` (never returns)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            code = FLUSH_FAILED_EXIT
    os._exit(code)
