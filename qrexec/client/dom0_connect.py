"""``qrexec-client -d dom0 -c REQID,SRCNAME,SRCID [-w N] COMMAND``: complete a VM → dom0 call.

The dom0 side of a call that the VM's daemon has allowed (spec §15.1), as R4.3's client
does it:

1. connect to ``qrexec.<SRCID>`` (the source by id), HELLO;
2. SERVICE_CONNECT, len 40: ``{0, 0}`` + REQID NUL-padded to 32 bytes;
3. the reply must be the same type, len 8, ``{SRCID, port}``; anything else (EOF, another
   length or type) exits 125. The socket stays open, unused, until we exit;
4. the rest - prepare and start the service, then vchan client of ``(SRCID, port)``
   within ``-w`` seconds (default 10, 0 = forever), HELLOs, STDERR EOF first, ``-p``
   data as STDOUT, the data phase - is :func:`qrexec.services.dom0.serve_dom0_call`,
   the code the daemon itself runs for VM → dom0 calls.

Exit: the service's code (0 with ``-E``); a failure to prepare exits with its 127 or 125
even with ``-E``; 125 when the daemon or the vchan fails. This path imports asyncio: it is
not per-call start-up critical (R4.3's daemon completes VM → dom0 calls in-process).
"""

from __future__ import annotations

import argparse
import asyncio

from qrexec.client.daemon_socket import DEFAULT_SOCKET_DIR, SOCKET_DIR_ENV, DaemonConnection
from qrexec.client.remote_call import parse_connect_arg
from qrexec.errors import QrexecError
from qrexec.lazy_logging import get_logger
from qrexec.protocol.constants import ExitCode
from qrexec.protocol.messages import ServiceConnect

log = get_logger(__name__)


def run_dom0_connect(args: argparse.Namespace, env: dict[str, str]) -> int:
    """Steps 1-4 of the module docstring; the exit code."""
    from qrexec.backends.select import load_backend
    from qrexec.protocol.negotiation import own_protocol_version
    from qrexec.services.dom0 import serve_dom0_call

    ident, source_name, source_id = parse_connect_arg(args.connect)
    socket_dir = args.socket_dir or env.get(SOCKET_DIR_ENV) or DEFAULT_SOCKET_DIR
    try:
        own_version = own_protocol_version(env)
        backend = load_backend(args.transport, env)
        daemon = DaemonConnection.open(socket_dir, str(source_id))
    except QrexecError as exc:
        log.error("%s", exc)
        return ExitCode.PROBLEM
    try:
        try:
            reply = daemon.request(ServiceConnect(0, 0, ident))
        except QrexecError as exc:
            log.error("SERVICE_CONNECT for %s: %s", args.connect, exc)
            return ExitCode.PROBLEM
        assert reply is not None
        result = asyncio.run(
            serve_dom0_call(
                backend,
                reply.connect_domain,
                reply.connect_port,
                args.cmdline,
                env,
                own_version,
                source_name=source_name,
                connect_timeout=args.timeout or None,
                prefix_data=args.prefix_data.encode("utf-8", "surrogateescape"),
            )
        )
    finally:
        daemon.close()
    if result.code is None:
        return ExitCode.PROBLEM
    if result.prepare_failed or not args.no_exit_code:
        return result.code
    return ExitCode.OK
