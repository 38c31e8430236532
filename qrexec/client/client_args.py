"""Command line of ``qrexec-client`` (spec §8), scanned like R4.3's ``getopt_long``.

Options (``-h`` prints them all)::

    -d DEST   -l LOCAL_CMD   -c REQID,SRCNAME,SRCDOMID   -e   -E/--no-exit-code   -t   -T
    -w SECONDS   -W   -k   -p/--prefix-data DATA   --use-stdin-socket   --socket-dir DIR
    --transport NAME   -v/--verbose   -h/--help

Options may come after the command line (GNU permutation, as upstream's); ``--`` ends them.
``-l`` and ``-e`` exclude each other here; what ``-c`` may be combined with is the program's
business (:mod:`.cli`). Usage errors raise :class:`~qrexec.errors.UsageError` (exit 2).
Pure: no I/O; imports neither argparse nor typing.
"""

from __future__ import annotations

from qrexec.client.options import scan
from qrexec.errors import UsageError

TYPE_CHECKING = False  # typing is not imported at run time (lean start-up)
if TYPE_CHECKING:
    from dataclasses import dataclass
else:
    from qrexec._record import dataclass

#: qrexec-client waits this long for the agent's data connection (spec §3.5; 0 = forever).
DEFAULT_CONNECT_TIMEOUT = 10.0

USAGE = """\
usage: qrexec-client [options] -d DEST [-l LOCAL_CMD|-c REQID,SRCNAME,SRCDOMID|-e] USER:CMDLINE
options:
  -d DEST                   destination: a VM name, uuid:UUID, or dom0 (dom0, @adminvm)
  -l LOCAL_CMD              run LOCAL_CMD here, connected to the remote command's stdio
  -c REQID,SRCNAME,SRCDOMID connect a VM's pending request (response to a trigger)
  -e                        JUST_EXEC: start the command, return its exit code only
  -E, --no-exit-code        always exit 0 once the command has exited
  -t                        replace problematic bytes with '_' in stdout (-T: in stderr)
  -T                        replace problematic bytes with '_' in stderr
  -w SECONDS                wait this long for the connection (default 10; 0: forever)
  -W                        wait for the connection's end, also with -c
  -k                        kill the domain (admin.vm.Kill) right before exiting
  -p, --prefix-data DATA    send DATA before stdin (once)
  --use-stdin-socket        fd 0 is a socket, used for both stdin and stdout
  --socket-dir DIR          daemon sockets (env QREXEC_DAEMON_SOCKET_DIR, /var/run/qubes)
  --transport NAME          socket or vchan (default: QREXEC_TRANSPORT, then the rule)
  -v, --verbose             debug logging
  -h, --help                this text
"""

_SHORTS = "hd:l:ec:Ep:tTw:Wkv"
_LONGS = {
    "help": False,
    "no-exit-code": False,
    "prefix-data": True,
    "use-stdin-socket": False,
    "socket-dir": True,
    "transport": True,
    "verbose": False,
}


class HelpRequested(Exception):
    """``-h``: print :data:`USAGE` and exit 0."""


@dataclass
class ClientOptions:
    """A parsed ``qrexec-client`` command line (the attribute names of the old parser)."""

    dest: str
    cmdline: str
    local_cmd: str | None = None
    connect: str | None = None
    just_exec: bool = False
    no_exit_code: bool = False
    filter_stdout: bool = False
    filter_stderr: bool = False
    timeout: float = DEFAULT_CONNECT_TIMEOUT
    wait: bool = False
    kill: bool = False
    prefix_data: str = ""
    use_stdin_socket: bool = False
    socket_dir: str | None = None
    transport: str | None = None
    verbose: bool = False


def _seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0 or seconds == float("inf"):
        raise UsageError(f"-w expects a number of seconds, not {value!r}")
    return seconds


def parse_args(argv: list[str]) -> ClientOptions:
    """Parse ``argv`` (without the program name); UsageError or HelpRequested."""
    options, operands = scan(argv, _SHORTS, _LONGS, permute=True)
    found: dict[str, object] = {}
    prefix: str | None = None
    for name, value in options:
        if name in ("-h", "--help"):
            raise HelpRequested
        if name == "-d":
            found["dest"] = value
        elif name == "-l":
            found["local_cmd"] = value
        elif name == "-c":
            found["connect"] = value
        elif name == "-e":
            found["just_exec"] = True
        elif name in ("-E", "--no-exit-code"):
            found["no_exit_code"] = True
        elif name == "-t":
            found["filter_stdout"] = True
        elif name == "-T":
            found["filter_stderr"] = True
        elif name == "-w":
            found["timeout"] = _seconds(value)
        elif name == "-W":
            found["wait"] = True
        elif name == "-k":
            found["kill"] = True
        elif name in ("-p", "--prefix-data"):
            if prefix is not None:
                raise UsageError("-p/--prefix-data can only be given once")
            prefix = value
        elif name == "--use-stdin-socket":
            found["use_stdin_socket"] = True
        elif name == "--socket-dir":
            found["socket_dir"] = value
        elif name == "--transport":
            found["transport"] = value
        elif name in ("-v", "--verbose"):
            found["verbose"] = True
    if "dest" not in found:
        raise UsageError("-d DEST is required")
    if not operands:
        raise UsageError("USER:CMDLINE is required")
    if len(operands) > 1:
        raise UsageError(f"unexpected arguments after the command line: {operands[1:]}")
    if found.get("just_exec") and "local_cmd" in found:
        raise UsageError("only one of -e and -l can be given")
    if found.get("use_stdin_socket") and "local_cmd" in found:
        raise UsageError("at most one of -l and --use-stdin-socket can be given")
    return ClientOptions(cmdline=operands[0], prefix_data=prefix or "", **found)  # type: ignore[arg-type]
