"""Per-stage trace of qrexec calls: one line per stage, merged later into a timeline.

Turned on per process by ``QREXEC_TRACE=1`` in its environment (``qrexec-sim up --trace``
passes it to every daemon, agent and the policy daemon; a client traces when its own
environment has it). Lines go to the file named by ``QREXEC_TRACE_FILE`` (opened in append
mode; every line is one ``write`` below PIPE_BUF, so processes sharing the file do not
interleave within a line), else to stderr::

    qrexec-trace <CLOCK_MONOTONIC ns> <program> <pid> <stage> key=value ...

The keys link the lines of one call across processes without adding anything to the wire
or to the policy protocol: ``vchan=S-C-P`` names a data vchan by its server domain, client
domain and port (both ends know all three), ``call=`` is a client's own numbering,
``conn=`` a daemon's, ``req=`` the request id a daemon and an agent share for a VM's
trigger, and ``src``/``svc``/``tgt`` the policy question. :mod:`qrexec.trace_merge` joins
them.

Zero cost when off: call sites test :data:`ON` (a module constant) before calling
:func:`point`, so no argument is formatted and no clock is read. Does no other I/O.
"""

from __future__ import annotations

import os
import sys

ON: bool = os.environ.get("QREXEC_TRACE", "") not in ("", "0")
#: Name of this program in trace lines (set by each program's main).
program = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python"
_fd: int | None = None
#: The ``call=`` key of a per-call CLI: its pid (one call per process).
CLI_CALL = f"{os.getpid()}.0"


def set_program(name: str) -> None:
    global program
    program = name.replace(" ", "_")


def vchan_key(own_domain: int, remote_domain: int, port: int, *, server: bool = True) -> str:
    """``S-C-P`` for a data vchan: the server's domain, the client's, the port."""
    if server:
        return f"{own_domain}-{remote_domain}-{port}"
    return f"{remote_domain}-{own_domain}-{port}"


def _open() -> int:
    global _fd
    path = os.environ.get("QREXEC_TRACE_FILE")
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
    _fd = os.open(path, flags, 0o644) if path else 2
    return _fd


def point(stage: str, **fields: object) -> None:
    """Write one trace line for ``stage`` (callers check :data:`ON` first)."""
    import time

    now = time.monotonic_ns()
    parts = [f"qrexec-trace {now} {program} {os.getpid()} {stage}"]
    for name, value in fields.items():
        text = str(value).replace(" ", "_").replace("\n", "_")
        parts.append(f"{name}={text}")
    line = (" ".join(parts) + "\n").encode("utf-8", "replace")
    fd = _fd if _fd is not None else _open()
    try:
        os.write(fd, line)
    except OSError:
        return  # tracing never breaks a call
