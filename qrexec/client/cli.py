"""``qrexec-client`` (dom0): run a command or service in a VM, or a service in dom0.

Usage (spec §8)::

    qrexec-client -d DEST [-l LOCAL_CMD | -c REQID,SRCNAME,SRCDOMID | -e] [-E] [-t] [-T]
                  [-w SECONDS] [-W] [-p/--prefix-data DATA] [--use-stdin-socket]
                  [--socket-dir DIR] [--transport {socket,vchan}] USER:CMDLINE

DEST is a VM name, ``uuid:UUID``, or dom0 (``dom0``, ``@adminvm``,
``uuid:00000000-0000-0000-0000-000000000000``). Exit code: the remote one (0 with
``-E``); 125 for a qrexec problem; 127 when a dom0 service does not exist; 2 for usage
errors (1 for a bad ``-c``, or ``-c`` with ``-e``/``-l``); ``-d VM -c``: 0 on success
and 137 on failure; ``-d dom0 -c``: the dom0 service's code (:mod:`.dom0_connect`).
``-d dom0`` without ``-c`` execs the service in place (:mod:`.local_call`).

It starts once per call, so it imports lazily and never imports asyncio. It is the vchan
*server* of the data connection: it listens on the port the daemon allocated while the
agent connects. Env: ``QREXEC_DAEMON_SOCKET_DIR`` (default ``/var/run/qubes``),
``QREXEC_PROTOCOL_VERSION``, the transport variables.
"""

from __future__ import annotations

import argparse
import os
import sys

from qrexec.lazy_logging import configure, get_logger, sync
from qrexec.protocol.constants import ExitCode

log = get_logger("qrexec.client")

DOM0_NAMES = frozenset({"dom0", "@adminvm", "uuid:00000000-0000-0000-0000-000000000000"})
#: qrexec-client waits this long for the agent's data connection (spec §3.5; 0 = forever).
DEFAULT_CONNECT_TIMEOUT = 10.0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qrexec-client", description="run a command or service in a domain"
    )
    parser.add_argument("-d", dest="dest", required=True, help="destination domain")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("-l", dest="local_cmd", help="local command connected to the remote one")
    mode.add_argument("-e", dest="just_exec", action="store_true", help="JUST_EXEC: exit code only")
    # Not in the group: with -e or -l it is a usage error that exits 1, as in R4.3.
    parser.add_argument("-c", dest="connect", help="REQID,SRCNAME,SRCDOMID: answer a VM's request")
    parser.add_argument("-E", "--no-exit-code", action="store_true", help="always exit 0")
    parser.add_argument("-t", dest="filter_stdout", action="store_true", help="filter stdout")
    parser.add_argument("-T", dest="filter_stderr", action="store_true", help="filter stderr")
    parser.add_argument(
        "-w", dest="timeout", type=float, default=DEFAULT_CONNECT_TIMEOUT, help="connect timeout"
    )
    parser.add_argument("-W", dest="wait", action="store_true", help="wait for connection end")
    parser.add_argument("-k", dest="kill", action="store_true", help="kill the domain at exit")
    parser.add_argument("-p", "--prefix-data", default="", help="data sent before stdin")
    parser.add_argument("--use-stdin-socket", action="store_true", help="fd 0 is a socket")
    parser.add_argument("--socket-dir", help="daemon socket folder")
    parser.add_argument("--transport", help="socket or vchan (default: the selection rule)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("cmdline", help="USER:COMMAND or USER:QUBESRPC SERVICE+ARG SOURCE")
    return parser


#: R4.3 exits 1 on a bad ``-c`` (spec §15.1); other usage errors are argparse's 2.
USAGE_EXIT_CONNECT = 1


def _check_connect(args: argparse.Namespace) -> str | None:
    """Why ``-c`` cannot be used as given, or None."""
    if args.just_exec or args.local_cmd is not None:
        return "-c cannot be combined with -e or -l"
    from qrexec.client.remote_call import parse_connect_arg
    from qrexec.errors import UsageError

    try:
        parse_connect_arg(args.connect)
    except UsageError as exc:
        return str(exc)
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure(debug=args.verbose, format="qrexec-client: %(message)s")
    env = dict(os.environ)
    if args.connect is not None:
        usage = _check_connect(args)
        if usage is not None:
            log.error("%s", usage)
            return USAGE_EXIT_CONNECT
        if args.dest in DOM0_NAMES:
            from qrexec.client.dom0_connect import run_dom0_connect

            sync()
            return run_dom0_connect(args, env)
    if args.dest in DOM0_NAMES and args.connect is None:
        from qrexec.client.local_call import run_local_service

        sync()  # dom0-local services log through plain logging
        # It returns only when nothing could be exec'd: 127/125 stand even with -E (R4.3).
        return run_local_service(args.cmdline, env)
    from qrexec.client.remote_call import RemoteCall
    from qrexec.errors import QrexecError

    try:
        call = RemoteCall(args, env)
        code = call.run()
    except QrexecError as exc:
        log.error("%s", exc)
        code = ExitCode.CONNECT_FAILED if args.connect else ExitCode.PROBLEM
        code = 0 if args.no_exit_code and not args.connect else code
    else:
        code = 0 if args.no_exit_code else code
    if args.kill:
        from qrexec.client.admin_kill import kill_domain

        problem = kill_domain(args.dest, env)
        if problem is not None:
            log.error("%s", problem)
    return code


if __name__ == "__main__":
    sys.exit(main())
