"""Building and starting the process of one call: argv, environment, identity (spec §7).

* Shell commands (``USER:COMMAND``): ``/bin/sh -c COMMAND`` in test mode; as root, the
  user's shell as a login shell (``argv[0]`` starting with ``-``) with ``-c COMMAND``.
* Executable services: the program with ``argv[1]`` = ARG when non-empty. The environment
  loses every ``QREXEC*`` variable except ``QREXEC_SERVICE_PATH`` and ``QREXEC_AGENT_PID``,
  then gets ``QREXEC_REMOTE_DOMAIN``, ``QREXEC_SERVICE_FULL_NAME``,
  ``QREXEC_SERVICE_ARGUMENT`` (whenever the name had a ``+``), ``QREXEC_REQUESTED_TARGET_TYPE``
  (empty in VMs; in dom0 ``name``/``keyword`` plus ``QREXEC_REQUESTED_TARGET`` or
  ``..._KEYWORD``) and ``QREXEC_AGENT_PID``. A root agent wraps the program in
  ``sh -l -c 'exec "$@"'`` so login profiles apply (what replaced qubes-rpc-multiplexer).

Blocking (``subprocess``) and free of asyncio, so ``qrexec-client`` reuses it for dom0-local
services. Does not move any data.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import IO, Any

from qrexec.errors import ServiceError
from qrexec.protocol.cmdline import RpcCall
from qrexec.services.users import RunAs

#: QREXEC* variables a service keeps from the agent's environment.
KEPT_QREXEC_VARIABLES = frozenset({"QREXEC_SERVICE_PATH", "QREXEC_AGENT_PID"})
LOGIN_WRAPPER = ("/bin/sh", "-l", "-c", 'exec "$@"', "sh")

_StdStream = int | IO[Any] | None


@dataclass(frozen=True, slots=True)
class ProcessSpec:
    """Everything needed to start one call's process.

    ``executable`` is set when ``argv[0]`` is not the program path (login shells).
    """

    argv: tuple[str, ...]
    env: dict[str, str]
    run_as: RunAs
    executable: str | None = None


def clean_environment(base: Mapping[str, str]) -> dict[str, str]:
    """``base`` without the agent's own ``QREXEC*`` settings."""
    return {
        key: value
        for key, value in base.items()
        if not key.startswith("QREXEC") or key in KEPT_QREXEC_VARIABLES
    }


def service_environment(
    base: Mapping[str, str], call: RpcCall, run_as: RunAs, agent_pid: int, *, in_dom0: bool
) -> dict[str, str]:
    """The environment of a service process (see the module docstring)."""
    env = clean_environment(base)
    env.update(run_as.login_environment())
    env["QREXEC_REMOTE_DOMAIN"] = call.source
    env["QREXEC_SERVICE_FULL_NAME"] = call.name.full_name
    if call.name.argument is not None:
        env["QREXEC_SERVICE_ARGUMENT"] = call.name.argument
    env["QREXEC_AGENT_PID"] = str(agent_pid)
    env["QREXEC_REQUESTED_TARGET_TYPE"] = ""
    if in_dom0 and call.target_type is not None and call.target is not None:
        env["QREXEC_REQUESTED_TARGET_TYPE"] = call.target_type
        if call.target_type == "keyword":
            env["QREXEC_REQUESTED_TARGET_KEYWORD"] = call.target
        else:
            env["QREXEC_REQUESTED_TARGET"] = call.target
    return env


def shell_command_spec(
    command: str, run_as: RunAs, base: Mapping[str, str], agent_pid: int
) -> ProcessSpec:
    """``USER:COMMAND`` as a process."""
    env = clean_environment(base)
    env.update(run_as.login_environment())
    env["QREXEC_AGENT_PID"] = str(agent_pid)
    if run_as.login:
        shell = run_as.shell
        login_name = "-" + os.path.basename(shell)
        return ProcessSpec((login_name, "-c", command), env, run_as, executable=shell)
    return ProcessSpec(("/bin/sh", "-c", command), env, run_as)


def service_spec(
    argv: Sequence[str],
    call: RpcCall,
    run_as: RunAs,
    base: Mapping[str, str],
    agent_pid: int,
    *,
    in_dom0: bool = False,
) -> ProcessSpec:
    """An executable service as a process (wrapped in ``sh -l`` by a root agent)."""
    env = service_environment(base, call, run_as, agent_pid, in_dom0=in_dom0)
    if run_as.login:
        return ProcessSpec((*LOGIN_WRAPPER, *argv), env, run_as)
    return ProcessSpec(tuple(argv), env, run_as)


def spawn(
    spec: ProcessSpec,
    *,
    stdin: _StdStream,
    stdout: _StdStream,
    stderr: _StdStream,
) -> subprocess.Popen[bytes]:
    """Start the process in a new session, as ``spec.run_as``; ServiceError if it cannot."""
    run_as = spec.run_as
    cwd = run_as.home if os.path.isdir(run_as.home) else "/"
    identity: dict[str, Any] = {}
    if run_as.switch:
        identity = {"user": run_as.uid, "group": run_as.gid, "extra_groups": list(run_as.groups)}
    try:
        return subprocess.Popen(
            list(spec.argv),
            executable=spec.executable,
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            env=spec.env,
            cwd=cwd,
            start_new_session=True,
            **identity,
        )
    except OSError as exc:
        raise ServiceError(f"cannot execute {spec.argv[0]!r}: {exc.strerror or exc}") from None
