"""The dom0 end of a VM → dom0 call (spec §4(iii)), run by the daemon of the calling VM.

Upstream forks a child of qrexec-daemon for this; here it is a task of the daemon, with
the same steps once SERVICE_CONNECT ``{0, port}`` has gone to the VM's agent:

1. the command ``QUBESRPC SERVICE+ARG SOURCE TYPE TARGET`` (TYPE ``name`` or ``keyword``,
   TARGET the requested target without ``@``) is looked up on dom0's own service path
   (``QREXEC_SERVICE_PATH`` inside ``QREXEC_DOMAIN_ROOT``, as for agents and
   ``qrexec-client -d dom0``), with its rpc-config;
2. connect as vchan client of ``(VM, port)`` within :data:`DOM0_CONNECT_TIMEOUT` (5 s);
3. read the VM's HELLO first (within :data:`DOM0_HELLO_TIMEOUT`), then send ours;
4. run the service as the daemon's own user, with ``QREXEC_REQUESTED_TARGET_TYPE`` and
   ``QREXEC_REQUESTED_TARGET`` / ``QREXEC_REQUESTED_TARGET_KEYWORD`` set. Its stderr is
   **not** forwarded: it goes to the daemon's log (our stderr), and STDERR EOF goes out
   first thing. Unix-socket services get the dom0 descriptor
   ``SERVICE+ARG SOURCE TYPE TARGET`` NUL.
5. A service that cannot be prepared answers STDERR EOF, STDOUT EOF and exit code 127
   (not found) or 125 (any other problem).

``wait-for-session`` in a dom0 rpc-config is ignored (dom0's session is the daemon's).
"""

from __future__ import annotations

import asyncio
import logging
import os
import pwd
import socket
from collections.abc import Callable, Mapping

from qrexec.backends.base import Backend
from qrexec.errors import ProtocolError, ServiceError, ServiceNotFound, TransportError
from qrexec.protocol.cmdline import RpcCall, parse_rpc_command
from qrexec.protocol.constants import ExitCode
from qrexec.protocol.messages import Hello, encode
from qrexec.protocol.negotiation import negotiate
from qrexec.services import relay
from qrexec.services.launch import service_spec, spawn
from qrexec.services.lookup import DomainRoot, ServiceKind, find_service_in_env
from qrexec.services.sockets import connect_service_socket
from qrexec.services.users import resolve_user

log = logging.getLogger(__name__)

#: The daemon's child waits this long for the VM's data vchan server (spec §3.5).
DOM0_CONNECT_TIMEOUT = 5.0
#: ... and this long for the VM's HELLO on it (a handshake step, docs/decisions.md).
DOM0_HELLO_TIMEOUT = 5.0


async def run_dom0_service(
    backend: Backend,
    vm_domid: int,
    port: int,
    command: str,
    env: Mapping[str, str],
    own_version: int,
    *,
    hello_timeout: float = DOM0_HELLO_TIMEOUT,
    on_data_phase: Callable[[], None] | None = None,
) -> int | None:
    """Serve one VM → dom0 call on ``(vm_domid, port)``; the exit code sent, or None.

    Connecting and the HELLO exchange have deadlines; once both HELLOs are through (the
    data phase, announced by ``on_data_phase``) nothing is timed any more.
    """
    try:
        call: RpcCall | None = parse_rpc_command(command)
    except ProtocolError as exc:
        log.error("cannot build the dom0 call %r: %s", command, exc)
        call = None
    try:
        stream = await backend.connect_async(vm_domid, port, timeout=DOM0_CONNECT_TIMEOUT)
    except (TransportError, TimeoutError, OSError) as exc:
        log.warning("domain %d did not serve data port %d: %s", vm_domid, port, exc)
        return None
    try:
        try:
            async with asyncio.timeout(hello_timeout):
                peer = await relay.read_hello(stream)
        except TimeoutError:
            log.warning(
                "domain %d sent no HELLO on data port %d within %g s", vm_domid, port, hello_timeout
            )
            return None
        version = negotiate(own_version, peer)
        await stream.send(encode(Hello(version)))
        if on_data_phase is not None:
            on_data_phase()
        channel = relay.DataChannel(stream, version)
        if call is None:
            await channel.finish_early(ExitCode.PROBLEM)
            return int(ExitCode.PROBLEM)
        return await _serve(channel, call, env)
    except (ProtocolError, TransportError, OSError) as exc:
        log.warning("dom0 call from domain %d port %d ended: %s", vm_domid, port, exc)
        return None
    finally:
        stream.close()


async def _serve(channel: relay.DataChannel, call: RpcCall, env: Mapping[str, str]) -> int:
    root = DomainRoot.from_env(None, env)
    try:
        target, config = find_service_in_env(call.name, env, root)
        run_as = resolve_user(pwd.getpwuid(os.getuid()).pw_name, root, env)
    except ServiceError as exc:
        failed = int(
            ExitCode.SERVICE_NOT_FOUND if isinstance(exc, ServiceNotFound) else ExitCode.PROBLEM
        )
        log.warning("dom0 service %s for %s: %s", call.name.full_name, call.source, exc)
        await channel.finish_early(failed)
        return failed
    log.info("running dom0 service %s for %s", call.name.full_name, call.source)
    if target.kind is not ServiceKind.EXECUTABLE:
        try:
            sock = await connect_service_socket(target)
        except ServiceError as exc:
            log.warning("%s", exc)
            await channel.finish_early(ExitCode.PROBLEM)
            return int(ExitCode.PROBLEM)
        if not config.skip_service_descriptor and not await relay.write_fd(
            sock.fileno(), call.descriptor
        ):
            sock.close()
            await channel.finish_early(ExitCode.PROBLEM)
            return int(ExitCode.PROBLEM)
        code: int | None = await relay.relay_socket(
            channel,
            sock,
            exit_on_client_eof=config.exit_on_client_eof,
            exit_on_service_eof=config.exit_on_service_eof,
        )
        return int(ExitCode.PROBLEM) if code is None else code
    spec = service_spec(target.argv, call, run_as, env, os.getpid(), in_dom0=True)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    stdout_r, stdout_w = os.pipe()
    # dom0 services keep their stderr (our log); the VM gets an empty STDERR stream.
    no_stderr_r, no_stderr_w = os.pipe()
    os.close(no_stderr_w)
    try:
        proc = spawn(spec, stdin=theirs.fileno(), stdout=stdout_w, stderr=None)
    except ServiceError as exc:
        log.warning("%s", exc)
        for fd in (stdout_r, stdout_w, no_stderr_r):
            os.close(fd)
        ours.close()
        theirs.close()
        await channel.finish_early(ExitCode.PROBLEM)
        return int(ExitCode.PROBLEM)
    theirs.close()
    os.close(stdout_w)
    code = await relay.relay_process(channel, proc, ours, stdout_r, no_stderr_r)
    return int(ExitCode.PROBLEM) if code is None else code
