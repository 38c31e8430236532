"""One dom0-requested call in the agent: EXEC_CMDLINE or JUST_EXEC, start to finish.

Steps: parse ``USER:[nogui:]COMMAND``; for ``QUBESRPC`` calls look the service and its
rpc-config up and honour ``force-user`` and ``wait-for-session``; decide the user
(:mod:`.users`); connect the data vchan as client of ``(connect_domain, connect_port)``
(120 s, as upstream); exchange HELLOs; run and relay (:mod:`qrexec.services.relay`). A call that
cannot run still connects and answers with exit code 127 (not found) or 125 (any other
problem), so the caller never hangs. The caller of :meth:`CallRunner.run` sends
CONNECTION_TERMINATED afterwards.

Does not touch the control channel.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from qrexec import trace
from qrexec.backends.base import AsyncStream, Backend
from qrexec.errors import (
    ProtocolError,
    ServiceError,
    ServiceNotFound,
    TransportError,
)
from qrexec.protocol.cmdline import (
    RpcCall,
    UserCommand,
    decode_cmdline,
    parse_rpc_command,
    parse_user_command,
    split_service_name,
)
from qrexec.protocol.constants import ExitCode, MsgType
from qrexec.protocol.messages import ExecRequest
from qrexec.services import relay
from qrexec.services.launch import ProcessSpec, service_spec, shell_command_spec, spawn
from qrexec.services.lookup import (
    DomainRoot,
    ServiceKind,
    ServiceTarget,
    find_config,
    find_service,
)
from qrexec.services.pam_launch import start_pam_process
from qrexec.services.rpc_config import RpcConfig, load_rpc_config
from qrexec.services.sockets import connect_service_socket
from qrexec.services.users import DEFAULT_PAM_SERVICE, resolve_user

log = logging.getLogger(__name__)

#: The agent waits this long for the caller's data vchan server (spec §3.5), and as long
#: again for its HELLO (a handshake step; the data phase after it has no deadline).
DATA_CONNECT_TIMEOUT = 120.0
WAIT_FOR_SESSION_SERVICE = "qubes.WaitForSession"


@dataclass
class AgentSettings:
    """What every call of one agent shares."""

    root: DomainRoot
    service_path: Sequence[str]
    config_path: Sequence[str]
    env: Mapping[str, str]
    own_version: int
    data_connect_timeout: float = DATA_CONNECT_TIMEOUT
    #: dom0 gives services the requested-target variables (spec §7).
    in_dom0: bool = False
    agent_pid: int = field(default_factory=os.getpid)
    #: PAM service of a root agent's calls, used when configured ("" = never).
    pam_service: str = DEFAULT_PAM_SERVICE


@dataclass
class PreparedCall:
    """What to run, decided before the data vchan exists; ``error`` if nothing can run."""

    user_command: UserCommand | None = None
    rpc: RpcCall | None = None
    target: ServiceTarget | None = None
    config: RpcConfig = field(default_factory=RpcConfig)
    spec: ProcessSpec | None = None
    error: ServiceError | None = None

    @property
    def error_code(self) -> int:
        if isinstance(self.error, ServiceNotFound):
            return ExitCode.SERVICE_NOT_FOUND
        return ExitCode.PROBLEM


class CallRunner:
    """Runs calls for one agent; one instance, many concurrent :meth:`run` tasks."""

    def __init__(self, backend: Backend, settings: AgentSettings) -> None:
        self.backend = backend
        self.settings = settings
        #: Only one qubes.WaitForSession runs at a time (spec §7).
        self._session_lock = asyncio.Lock()

    async def run(
        self, request: ExecRequest, *, on_data_phase: Callable[[], None] | None = None
    ) -> None:
        """Run one call; never raises except on cancellation.

        ``on_data_phase`` is called once both HELLOs are through: from then on the call
        runs to its end even if the control connection goes away.
        """
        where = f"domain {request.connect_domain} port {request.connect_port}"
        key = ""
        if trace.ON:
            key = trace.vchan_key(
                self.backend.own_domain, request.connect_domain, request.connect_port, server=False
            )
            trace.point("agent.exec_request", vchan=key, type=request.msg_type.name)
        prepared = await self.prepare(request.command)
        if trace.ON:
            trace.point("agent.prepared", vchan=key)
        if prepared.error is not None:
            log.warning("call for %s fails: %s", where, prepared.error)
        try:
            stream = await self.backend.connect_async(
                request.connect_domain,
                request.connect_port,
                timeout=self.settings.data_connect_timeout,
            )
        except (TransportError, TimeoutError, OSError) as exc:
            log.warning("cannot connect the data vchan to %s: %s", where, exc)
            return
        if trace.ON:
            trace.point("agent.vchan_connected", vchan=key)
        try:
            await self._serve(stream, request, prepared, on_data_phase, key)
        except (ProtocolError, TransportError, OSError) as exc:
            log.warning("call on %s ended: %s", where, exc)
        finally:
            stream.close()
            if trace.ON:
                trace.point("agent.teardown", vchan=key)

    async def prepare(self, raw_command: bytes) -> PreparedCall:
        prepared = PreparedCall()
        settings = self.settings
        try:
            command = parse_user_command(decode_cmdline(raw_command))
            prepared.user_command = command
            user = command.user
            if command.is_rpc:
                rpc = parse_rpc_command(command.command)
                prepared.rpc = rpc
                prepared.target = find_service(rpc.name, settings.service_path, settings.root)
                prepared.config = load_rpc_config(
                    find_config(rpc.name, settings.config_path, settings.root)
                )
                user = prepared.config.force_user or user
                if prepared.config.wait_for_session and not command.nogui:
                    await self.wait_for_session(user, rpc.source)
            run_as = resolve_user(
                user, settings.root, settings.env, pam_service=settings.pam_service
            )
            if prepared.rpc is None:
                prepared.spec = shell_command_spec(
                    command.command, run_as, settings.env, settings.agent_pid
                )
            elif prepared.target is not None and prepared.target.kind is ServiceKind.EXECUTABLE:
                check_executable(prepared.target.argv[0])
                prepared.spec = service_spec(
                    prepared.target.argv,
                    prepared.rpc,
                    run_as,
                    settings.env,
                    settings.agent_pid,
                    in_dom0=settings.in_dom0,
                )
        except ServiceError as exc:
            prepared.error = exc
        except ProtocolError as exc:
            prepared.error = ServiceError(f"malformed command line: {exc}")
        except (OSError, ValueError) as exc:
            # Anything else still answers the caller (125) instead of leaving it waiting.
            log.exception("unexpected error preparing a call")
            prepared.error = ServiceError(f"cannot prepare the call: {exc}")
        return prepared

    async def wait_for_session(self, user: str, source: str) -> None:
        """Run qubes.WaitForSession (stdin ``user\\n``) and wait for it, one at a time."""
        settings = self.settings
        try:
            target = find_service(
                split_service_name(WAIT_FOR_SESSION_SERVICE), settings.service_path, settings.root
            )
        except ServiceError as exc:
            log.warning(
                "wait-for-session requested but %s is unusable: %s", WAIT_FOR_SESSION_SERVICE, exc
            )
            return
        if target.kind is not ServiceKind.EXECUTABLE:
            log.warning("%s is not an executable; not waiting", WAIT_FOR_SESSION_SERVICE)
            return
        env = {k: v for k, v in settings.env.items() if not k.startswith("QREXEC")}
        env["QREXEC_REMOTE_DOMAIN"] = source
        env["QREXEC_SERVICE_FULL_NAME"] = WAIT_FOR_SESSION_SERVICE
        async with self._session_lock:
            try:
                proc = subprocess.Popen(
                    list(target.argv),
                    stdin=subprocess.PIPE,
                    stdout=subprocess.DEVNULL,
                    env=env,
                    start_new_session=True,
                )
            except OSError as exc:
                raise ServiceError(f"cannot run {WAIT_FOR_SESSION_SERVICE}: {exc}") from None
            assert proc.stdin is not None
            with contextlib.suppress(BrokenPipeError):
                proc.stdin.write(user.encode() + b"\n")
            proc.stdin.close()
            code = await relay.wait_process(proc)
            log.info("%s for %s exited with %d", WAIT_FOR_SESSION_SERVICE, user, code)

    async def _serve(
        self,
        stream: AsyncStream,
        request: ExecRequest,
        prepared: PreparedCall,
        on_data_phase: Callable[[], None] | None = None,
        key: str = "",
    ) -> None:
        timeout = self.settings.data_connect_timeout
        try:
            async with asyncio.timeout(timeout):
                version = await relay.handshake(stream, self.settings.own_version)
        except TimeoutError:
            raise TransportError(f"no HELLO on the data vchan within {timeout:g} s") from None
        if on_data_phase is not None:
            on_data_phase()
        channel = relay.DataChannel(stream, version)
        channel.trace_key = key
        if trace.ON:
            trace.point("agent.hello", vchan=key, version=version)
        if prepared.error is not None:
            if request.msg_type is MsgType.JUST_EXEC:
                await channel.send_exit(prepared.error_code)
            else:
                await channel.finish_early(prepared.error_code, stdout_first=True)
            return
        if request.msg_type is MsgType.JUST_EXEC:
            await self._just_exec(channel, prepared)
            return
        if prepared.spec is not None:
            code = await self._run_process(channel, prepared.spec)
        else:
            code = await self._run_socket(channel, prepared)
        log.info("call on port %d finished with %s", request.connect_port, code)
        if trace.ON:
            trace.point("agent.exit_code_sent", vchan=key, code=code)

    async def _just_exec(self, channel: relay.DataChannel, prepared: PreparedCall) -> None:
        """JUST_EXEC: stdio on /dev/null, exit code 0 at once (127 or 125 if it cannot start).

        A socket service is connected and gets its descriptor, then the exit code 0 goes
        out and the socket is closed unread (spec §15.5).
        """
        if prepared.spec is None:
            await channel.send_exit(await self._just_connect(prepared))
            return
        try:
            proc = await start_process(
                prepared.spec,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        except ServiceError as exc:
            # As for EXEC_CMDLINE: 127 when execve failed with ENOENT, else 125 (§15.6).
            log.warning("%s", exc)
            await channel.send_exit(exec_failure_code(exc))
            return
        relay.reap_in_background(proc)
        await channel.send_exit(ExitCode.OK)

    async def _just_connect(self, prepared: PreparedCall) -> int:
        """Connect a socket service, write its descriptor and close it: 0, or 125."""
        target, rpc, config = prepared.target, prepared.rpc, prepared.config
        assert target is not None and rpc is not None
        try:
            sock = await connect_service_socket(target)
        except ServiceError as exc:
            log.warning("%s", exc)
            return ExitCode.PROBLEM
        with sock:
            if config.skip_service_descriptor or await relay.write_fd(
                sock.fileno(), rpc.descriptor
            ):
                return ExitCode.OK
        log.warning("socket service %s closed before taking its descriptor", target.path)
        return ExitCode.PROBLEM

    async def _run_process(self, channel: relay.DataChannel, spec: ProcessSpec) -> int | None:
        if trace.ON:
            trace.point("agent.spawn", vchan=channel.trace_key)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        stdout_r, stdout_w = os.pipe()
        stderr_r, stderr_w = os.pipe()
        try:
            proc = await start_process(
                spec, stdin=theirs.fileno(), stdout=stdout_w, stderr=stderr_w
            )
        except ServiceError as exc:
            # Upstream's forked child fails its execve: the call itself had started, and
            # the child's status is 127 for ENOENT (say, a missing interpreter), else 125.
            log.warning("%s", exc)
            for fd in (stdout_r, stdout_w, stderr_r, stderr_w):
                os.close(fd)
            ours.close()
            theirs.close()
            code = exec_failure_code(exc)
            await channel.finish_early(code, stdout_first=True)
            return code
        if trace.ON:
            trace.point("agent.child_started", vchan=channel.trace_key, pid=proc.pid)
        theirs.close()
        os.close(stdout_w)
        os.close(stderr_w)
        return await relay.relay_process(channel, proc, ours, stdout_r, stderr_r)

    async def _run_socket(self, channel: relay.DataChannel, prepared: PreparedCall) -> int | None:
        target, rpc, config = prepared.target, prepared.rpc, prepared.config
        assert target is not None and rpc is not None
        try:
            sock = await connect_service_socket(target)
        except ServiceError as exc:
            log.warning("%s", exc)
            await channel.finish_early(ExitCode.PROBLEM, stdout_first=True)
            return ExitCode.PROBLEM
        if not config.skip_service_descriptor and not await relay.write_fd(
            sock.fileno(), rpc.descriptor
        ):
            sock.close()
            await channel.finish_early(ExitCode.PROBLEM, stdout_first=True)
            return ExitCode.PROBLEM
        return await relay.relay_socket(
            channel,
            sock,
            exit_on_client_eof=config.exit_on_client_eof,
            exit_on_service_eof=config.exit_on_service_eof,
        )


async def start_process(
    spec: ProcessSpec, *, stdin: int, stdout: int, stderr: int
) -> subprocess.Popen[bytes]:
    """Start a call's process, through its PAM session when it has one."""
    if spec.run_as.pam_service is not None:
        return await start_pam_process(
            spec, spec.run_as.pam_service, stdin=stdin, stdout=stdout, stderr=stderr
        )
    return spawn(spec, stdin=stdin, stdout=stdout, stderr=stderr)


def exec_failure_code(exc: ServiceError) -> int:
    """127 when starting the program failed with ENOENT, else 125 (spec §15.6).

    :func:`~qrexec.agent.launch.spawn` raises ServiceError ``from None``; the OSError it
    replaced stays in ``__context__``.
    """
    cause = exc.__cause__ or exc.__context__
    if isinstance(cause, OSError) and cause.errno == errno.ENOENT:
        return ExitCode.SERVICE_NOT_FOUND
    return ExitCode.PROBLEM


def check_executable(program: str) -> None:
    """Fail with 125 before starting anything when ``program`` cannot be executed.

    The ``sh -l`` wrapper of a root agent would otherwise turn this into the shell's 126.
    """
    if not os.path.isfile(program) or not os.access(program, os.X_OK):
        raise ServiceError(f"service program {program} is missing or not executable")
