"""``qrexec-client`` (dom0): run a command or service in a VM, or a service in dom0.

Usage (spec §8; parsed by :mod:`.client_args`, ``-h`` lists every option)::

    qrexec-client -d DEST [-l LOCAL_CMD | -c REQID,SRCNAME,SRCDOMID | -e] [-E] [-t] [-T]
                  [-w SECONDS] [-W] [-k] [-p/--prefix-data DATA] [--use-stdin-socket]
                  [--socket-dir DIR] [--transport {socket,vchan}] [-v] USER:CMDLINE

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

import os
import sys

from qrexec import trace
from qrexec.lazy_logging import configure, get_logger, sync
from qrexec.protocol.constants import ExitCode

TYPE_CHECKING = False  # typing is not imported at run time (lean start-up)
if TYPE_CHECKING:
    from qrexec.client.client_args import ClientOptions

log = get_logger("qrexec.client")

DOM0_NAMES = frozenset({"dom0", "@adminvm", "uuid:00000000-0000-0000-0000-000000000000"})
#: Usage errors (wrong or missing options).
EXIT_USAGE = 2


#: R4.3 exits 1 on a bad ``-c`` (spec §15.1); other usage errors exit 2.
USAGE_EXIT_CONNECT = 1


def _check_connect(args: ClientOptions) -> str | None:
    """Why ``-c`` cannot be used as given, or None."""
    if args.just_exec or args.local_cmd is not None:
        return "-c cannot be combined with -e or -l"
    from qrexec.client.remote_call import parse_connect_arg
    from qrexec.errors import UsageError

    try:
        parse_connect_arg(args.connect or "")
    except UsageError as exc:
        return str(exc)
    return None


def main(argv: list[str] | None = None) -> int:
    if trace.ON:
        trace.set_program("qrexec-client")
        trace.point("client.start", call=trace.CLI_CALL)
    from qrexec.client.client_args import USAGE, HelpRequested, parse_args
    from qrexec.errors import UsageError

    try:
        args = parse_args(sys.argv[1:] if argv is None else list(argv))
    except HelpRequested:
        sys.stdout.write(USAGE)
        return 0
    except UsageError as exc:
        sys.stderr.write(f"qrexec-client: {exc}\n{USAGE}")
        return EXIT_USAGE
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
    from qrexec.client.process_exit import exit_now

    exit_now(main())
