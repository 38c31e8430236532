"""Command line of ``qrexec-client-vm`` (spec §8), parsed the way upstream parses it.

Usage::

    qrexec-client-vm [options] TARGET SERVICE[+ARG] [LOCAL_PROGRAM [ARGS...]]

Options: ``--buffer-size=N``, ``-t/--filter-escape-chars-stdout``,
``-T/--filter-escape-chars-stderr``, ``--no-filter-escape-chars-stdout``,
``--no-filter-escape-chars-stderr``, ``-a/--agent-socket=PATH``, ``-p/--prefix-data=DATA``,
``--use-stdin-socket``, ``-s/--source-qube=NAME``, ``-h/--help``. Option parsing stops at
the first non-option (POSIX ``getopt``, not GNU permutation), so options meant for
LOCAL_PROGRAM are never taken as ours.

Defaults follow upstream: filtering is on for a stream that is a terminal - stdout only
when there is no local program (with one, our stdout is not where the service's output
goes). A ``$`` in TARGET reads as ``@`` (shells make ``@`` awkward in old scripts); the
``--source-qube`` value is left alone. TARGET and ``--source-qube`` longer than their
63-byte fields are cut silently when the trigger is built, as upstream does (spec §15.7).

Untrusted-boundary checks done here (a usage error, exit 2, names what was wrong): the
service name must not be empty, start with ``+`` or hold a NUL, and must fit the
65000-byte v3/v4 limit with its NUL. Characters are *not* filtered here: dom0's daemon
sanitises, as in Qubes.

Pure parsing: reads no environment except through the mapping it is given, does no I/O
besides ``isatty`` for the defaults. Imports only ``getopt`` and the protocol constants.
"""

from __future__ import annotations

import getopt
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from qrexec.errors import UsageError
from qrexec.protocol.constants import (
    MAX_SERVICE_NAME_LEN,
    VCHAN_DATA_RING_SIZE,
)

AGENT_SOCKET_ENV = "QREXEC_AGENT_SOCKET"
DEFAULT_AGENT_SOCKET = "/var/run/qubes/qrexec-agent"

USAGE = (
    "usage: qrexec-client-vm [options] TARGET SERVICE[+ARG] [LOCAL_PROGRAM [ARGS...]]\n"
    "options:\n"
    "  --buffer-size=N                    vchan buffer size (default 65536)\n"
    "  -t, --filter-escape-chars-stdout   filter non-printable bytes on stdout\n"
    "  -T, --filter-escape-chars-stderr   filter non-printable bytes on stderr\n"
    "  --no-filter-escape-chars-stdout    do not filter stdout\n"
    "  --no-filter-escape-chars-stderr    do not filter stderr\n"
    "  -a, --agent-socket=PATH            agent trigger socket "
    f"(env {AGENT_SOCKET_ENV}, default {DEFAULT_AGENT_SOCKET})\n"
    "  -p, --prefix-data=DATA             send DATA before stdin\n"
    "  --use-stdin-socket                 stdin is a socket, used both ways\n"
    "  -s, --source-qube=NAME             source qube of a relayed call (Qubes Air)\n"
    "  -h, --help                         this text\n"
)

_SHORT = "htTa:p:s:"
_LONG = [
    "help",
    "buffer-size=",
    "filter-escape-chars-stdout",
    "filter-escape-chars-stderr",
    "no-filter-escape-chars-stdout",
    "no-filter-escape-chars-stderr",
    "agent-socket=",
    "prefix-data=",
    "use-stdin-socket",
    "source-qube=",
]
#: Upstream refuses absurd ring sizes; the socket emulation would accept anything.
MIN_BUFFER_SIZE = 1024
MAX_BUFFER_SIZE = 1 << 30


class HelpRequested(Exception):
    """``-h``: print :data:`USAGE` and exit 0."""


@dataclass(frozen=True, slots=True)
class ClientVmOptions:
    """A parsed ``qrexec-client-vm`` command line."""

    target: str
    service: str
    local_program: tuple[str, ...]
    agent_socket: str
    buffer_size: int = VCHAN_DATA_RING_SIZE
    filter_stdout: bool = False
    filter_stderr: bool = False
    prefix_data: bytes = b""
    use_stdin_socket: bool = False
    source_qube: str = ""


def _isatty(fd: int) -> bool:
    try:
        return os.isatty(fd)
    except OSError:
        return False


def _check_field(value: str, size: int, what: str) -> None:
    raw = value.encode("utf-8", "surrogateescape")
    if b"\0" in raw:
        raise UsageError(f"{what} contains a NUL byte")
    if len(raw) >= size:
        raise UsageError(f"{what} {value[:80]!r} is {len(raw)} bytes; at most {size - 1} fit")


def parse_args(argv: Sequence[str], env: Mapping[str, str]) -> ClientVmOptions:
    """Parse ``argv`` (without the program name); UsageError or HelpRequested."""
    try:
        opts, rest = getopt.getopt(list(argv), _SHORT, _LONG)
    except getopt.GetoptError as exc:
        raise UsageError(str(exc)) from None
    filter_stdout: bool | None = None
    filter_stderr: bool | None = None
    agent_socket: str | None = None
    buffer_size = VCHAN_DATA_RING_SIZE
    prefix = b""
    use_stdin_socket = False
    source_qube = ""
    for name, value in opts:
        if name in ("-h", "--help"):
            raise HelpRequested
        if name == "--buffer-size":
            if not value.isascii() or not value.isdigit():
                raise UsageError(f"--buffer-size expects a number of bytes, not {value!r}")
            buffer_size = int(value)
            if not MIN_BUFFER_SIZE <= buffer_size <= MAX_BUFFER_SIZE:
                raise UsageError(
                    f"--buffer-size {buffer_size} is outside {MIN_BUFFER_SIZE}..{MAX_BUFFER_SIZE}"
                )
        elif name in ("-t", "--filter-escape-chars-stdout"):
            filter_stdout = True
        elif name in ("-T", "--filter-escape-chars-stderr"):
            filter_stderr = True
        elif name == "--no-filter-escape-chars-stdout":
            filter_stdout = False
        elif name == "--no-filter-escape-chars-stderr":
            filter_stderr = False
        elif name in ("-a", "--agent-socket"):
            agent_socket = value
        elif name in ("-p", "--prefix-data"):
            prefix = value.encode("utf-8", "surrogateescape")
        elif name == "--use-stdin-socket":
            use_stdin_socket = True
        elif name in ("-s", "--source-qube"):
            source_qube = value
    if len(rest) < 2:
        raise UsageError("TARGET and SERVICE[+ARG] are required")
    target = rest[0].replace("$", "@")
    service = rest[1]
    local_program = tuple(rest[2:])
    if not service or service.startswith("+"):
        raise UsageError(f"SERVICE {service!r} is empty or has no name before '+'")
    # The name travels NUL-terminated; hdr.len - prefix counts the NUL (spec §3.3).
    _check_field(service, MAX_SERVICE_NAME_LEN, "SERVICE")
    if use_stdin_socket and local_program:
        raise UsageError("--use-stdin-socket and a LOCAL_PROGRAM exclude each other")
    if filter_stdout is None:
        filter_stdout = not local_program and _isatty(1)
    if filter_stderr is None:
        filter_stderr = _isatty(2)
    return ClientVmOptions(
        target=target,
        service=service,
        local_program=local_program,
        agent_socket=agent_socket or env.get(AGENT_SOCKET_ENV) or DEFAULT_AGENT_SOCKET,
        buffer_size=buffer_size,
        filter_stdout=filter_stdout,
        filter_stderr=filter_stderr,
        prefix_data=prefix,
        use_stdin_socket=use_stdin_socket,
        source_qube=source_qube,
    )
