"""dom0 as destination: ``qrexec-client -d dom0 'DEFAULT:QUBESRPC SVC+ARG SRC [TYPE TARGET]'``.

No vchan: the service is looked up on dom0's own service path (``QREXEC_SERVICE_PATH``,
inside ``QREXEC_DOMAIN_ROOT`` when set, as for agents) and **exec'd in place**, as R4.3
does (spec §15.7): it inherits our stdio and pid, and its exit status is ours (``-E``
cannot apply). It gets the dom0 service environment (``QREXEC_REQUESTED_TARGET_TYPE`` and
friends; no ``QREXEC_AGENT_PID``). Socket and ``/dev/tcp`` services cannot be exec'd:
125, as upstream. Exit codes when nothing could be exec'd: 127 when not found, 125
otherwise. Blocking; no asyncio.
"""

from __future__ import annotations

import logging
import os

from qrexec.errors import ProtocolError, ServiceError, ServiceNotFound
from qrexec.protocol.cmdline import (
    DEFAULT_USER_TOKEN,
    parse_rpc_command,
    parse_user_command,
)
from qrexec.protocol.constants import ExitCode
from qrexec.services.launch import service_environment
from qrexec.services.lookup import (
    DomainRoot,
    ServiceKind,
    find_service_in_env,
    is_missing_path_error,
)
from qrexec.services.users import RunAs

log = logging.getLogger(__name__)


def run_local_service(cmdline: str, env: dict[str, str]) -> int:
    """Exec a dom0-local QUBESRPC call in place; returns only when it cannot (127/125)."""
    try:
        command = parse_user_command(cmdline)
        if command.user != DEFAULT_USER_TOKEN or not command.is_rpc:
            raise ServiceError(
                "a call to dom0 must be 'DEFAULT:QUBESRPC SERVICE+ARG SOURCE [TYPE TARGET]'"
            )
        call = parse_rpc_command(command.command)
        root = DomainRoot.from_env(None, env)
        target, _ = find_service_in_env(call.name, env, root)
        if target.kind is not ServiceKind.EXECUTABLE:
            # R4.3 execs the service file itself, which cannot work for these (§15.7).
            raise ServiceError(f"{target.path} is a {target.kind.value} service; it needs -c")
        service_env = service_environment(env, call, _no_switch(env), 0, in_dom0=True)
        # dom0 services get no QREXEC_AGENT_PID (no SIGUSR1 mode in dom0).
        service_env.pop("QREXEC_AGENT_PID", None)
        for name in ("HOME", "SHELL", "USER", "LOGNAME"):
            if name in env:
                service_env[name] = env[name]
            else:
                service_env.pop(name, None)
        argv = list(target.argv)
        for handler in logging.getLogger().handlers:
            handler.flush()
        try:
            os.execve(argv[0], argv, service_env)
        except OSError as exc:
            missing = is_missing_path_error(exc)
            raise (ServiceNotFound if missing else ServiceError)(
                f"cannot execute {argv[0]}: {exc.strerror or exc}"
            ) from None
    except ServiceNotFound as exc:
        log.error("%s", exc)
        return ExitCode.SERVICE_NOT_FOUND
    except (ServiceError, ProtocolError) as exc:
        log.error("%s", exc)
        return ExitCode.PROBLEM
    raise AssertionError("execve returned")  # pragma: no cover


def _no_switch(env: dict[str, str]) -> RunAs:
    """Our own identity (only its login variables are used, and then replaced)."""
    return RunAs("", os.getuid(), os.getgid(), (), env.get("HOME", "/"), "/bin/sh", False)
