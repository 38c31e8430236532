"""dom0 as destination: ``qrexec-client -d dom0 'DEFAULT:QUBESRPC SVC+ARG SRC [TYPE TARGET]'``.

No vchan: the service is looked up on dom0's own service path (``QREXEC_SERVICE_PATH``,
inside ``QREXEC_DOMAIN_ROOT`` when set, as for agents) and run here with our stdin and
stdout, with the dom0 service environment (``QREXEC_REQUESTED_TARGET_TYPE`` and friends).
Socket services are relayed between our stdio and the socket. Exit codes: the service's
(signal -> 128 + n); 127 when not found; 125 when it cannot run. Blocking; no asyncio.
"""

from __future__ import annotations

import logging
import os
import pwd
import socket
import threading

from qrexec.client.daemon_socket import connect_unix
from qrexec.errors import ProtocolError, ServiceError, ServiceNotFound
from qrexec.protocol.cmdline import (
    DEFAULT_USER_TOKEN,
    RpcCall,
    parse_rpc_command,
    parse_user_command,
)
from qrexec.protocol.constants import SIGNAL_EXIT_BASE, ExitCode
from qrexec.services.launch import service_spec, spawn
from qrexec.services.lookup import (
    DomainRoot,
    ServiceKind,
    ServiceTarget,
    find_service_in_env,
)
from qrexec.services.users import RunAs

log = logging.getLogger(__name__)


def _current_user(env: dict[str, str]) -> RunAs:
    entry = pwd.getpwuid(os.getuid())
    home = env.get("HOME", entry.pw_dir)
    return RunAs(
        entry.pw_name, entry.pw_uid, entry.pw_gid, (), home, entry.pw_shell or "/bin/sh", False
    )


def run_local_service(cmdline: str, env: dict[str, str]) -> int:
    """Run a dom0-local QUBESRPC call with our stdio; its exit code."""
    try:
        command = parse_user_command(cmdline)
        if command.user != DEFAULT_USER_TOKEN or not command.is_rpc:
            raise ServiceError(
                "a call to dom0 must be 'DEFAULT:QUBESRPC SERVICE+ARG SOURCE [TYPE TARGET]'"
            )
        call = parse_rpc_command(command.command)
        root = DomainRoot.from_env(None, env)
        target, config = find_service_in_env(call.name, env, root)
        if target.kind is not ServiceKind.EXECUTABLE:
            return _relay_socket(target, call, send_descriptor=not config.skip_service_descriptor)
        spec = service_spec(target.argv, call, _current_user(env), env, os.getpid(), in_dom0=True)
        proc = spawn(spec, stdin=0, stdout=1, stderr=2)
    except ServiceNotFound as exc:
        log.error("%s", exc)
        return ExitCode.SERVICE_NOT_FOUND
    except (ServiceError, ProtocolError) as exc:
        log.error("%s", exc)
        return ExitCode.PROBLEM
    code = proc.wait()
    return SIGNAL_EXIT_BASE - code if code < 0 else code


def _relay_socket(target: ServiceTarget, call: RpcCall, *, send_descriptor: bool) -> int:
    if target.kind is ServiceKind.TCP:
        assert target.tcp is not None
        sock = socket.create_connection(target.tcp)
    else:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            connect_unix(sock, target.path)
        except OSError as exc:
            sock.close()
            raise ServiceError(f"cannot connect to {target.path}: {exc}") from None
    with sock:
        if send_descriptor:
            sock.sendall(call.descriptor)

        def forward_input() -> None:
            try:
                while data := os.read(0, 65536):
                    sock.sendall(data)
                sock.shutdown(socket.SHUT_WR)
            except OSError as exc:
                log.debug("input relay: %s", exc)

        threading.Thread(target=forward_input, daemon=True).start()
        while data := sock.recv(65536):
            os.write(1, data)
    return ExitCode.OK
