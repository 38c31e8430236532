"""dom0 as the service side of a VM → dom0 call (spec §4(iii), §15.1, §15.6).

One implementation for both places that do it: ``qrexec-client -d dom0 -c
REQID,SRCNAME,SRCID COMMAND`` and the daemon's in-process path (what upstream's daemon
child does, with a 5 s connect limit). The order is R4.3's:

1. **prepare** (:func:`prepare_dom0_service`) - parse COMMAND, read the rpc-config, run
   ``qubes.WaitForSession`` when it asks for it, look the service up and *start* it
   (fork/exec with AF_UNIX socketpairs as stdin and stdout, or connect the socket or
   ``/dev/tcp`` service and write its descriptor);
2. only then become vchan **client** of ``(VM, port)``; a failure there ends the call
   with nothing sent;
3. read the VM's HELLO, send ours (our own version, as the C side does);
4. send STDERR EOF first - a dom0 service's stderr is never forwarded, it goes to our own
   stderr (the daemon log) - then ``prefix_data`` as STDOUT;
5. a failure to prepare sends STDOUT EOF and EXIT_CODE (127 not found, 125 anything else);
   otherwise the data phase runs until the service's stdout ends and it has been reaped:
   STDOUT EOF, EXIT_CODE (status, or 128 + signal), close. The caller's STDIN EOF shuts
   the service's stdin down; data the service does not take yet is held and the vchan is
   not read meanwhile; STDIN after the service closed its stdin is dropped. If the vchan
   closes first, no code is sent and the service's status is still waited for.

COMMAND (no ``USER:`` part): a leading ``nogui:`` is dropped and skips the rpc-config and
wait-for-session; anything not starting with ``QUBESRPC`` runs as ``/bin/bash -c
COMMAND`` with ``QREXEC_REMOTE_DOMAIN`` = the source's name; ``QUBESRPC SVC[+ARG] SOURCE
[TYPE TARGET]`` is a service. An executable needs exactly 2 or 4 words after ``QUBESRPC``
(3 or 5 behave as a child that exits 125); TYPE ``name`` sets
``QREXEC_REQUESTED_TARGET``, ``keyword`` ``QREXEC_REQUESTED_TARGET_KEYWORD``, any other
word only ``QREXEC_REQUESTED_TARGET_TYPE``. ``QREXEC_AGENT_PID`` is not set (dom0 has no
SIGUSR1 mode). A malformed line (no space, no SOURCE, an empty name, a name over 255
bytes) is a failure to prepare (125) - upstream crashes there (``docs/decisions.md``).

Socket and ``/dev/tcp`` services get the descriptor: every word after ``QUBESRPC `` as
sent, plus NUL, unless ``skip-service-descriptor``; their exit code is 0.

asyncio; the per-call client runs it with ``asyncio.run`` (this path is rare: R4.3's
daemon does it in-process). Does not talk to the daemon socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from qrexec.backends.base import Backend
from qrexec.errors import (
    RemoteProtocolError,
    ServiceError,
    ServiceNotFound,
    TransportError,
)
from qrexec.protocol.cmdline import NOGUI_PREFIX, ServiceName, split_service_name
from qrexec.protocol.constants import MAX_SERVICE_FILE_NAME, ExitCode, MsgType
from qrexec.protocol.messages import Hello, encode
from qrexec.protocol.negotiation import negotiate
from qrexec.services import relay as service_io
from qrexec.services.launch import clean_environment
from qrexec.services.lookup import (
    DEFAULT_RPC_CONFIG_PATH,
    DEFAULT_SERVICE_PATH,
    RPC_CONFIG_PATH_ENV,
    SERVICE_PATH_ENV,
    DomainRoot,
    ServiceKind,
    find_config,
    find_service,
    search_path,
)
from qrexec.services.rpc_config import MAX_CONFIG_SIZE, RpcConfig, parse_rpc_config
from qrexec.services.sockets import connect_service_socket
from qrexec.services.splicing import can_splice, frame_pipe, pump_spliced

log = logging.getLogger(__name__)

RPC_WORD = "QUBESRPC"
SHELL = "/bin/bash"
WAIT_FOR_SESSION_SERVICE = "qubes.WaitForSession"


@dataclass
class Dom0Command:
    """COMMAND of a VM → dom0 call, split as R4.3 does (module docstring)."""

    nogui: bool
    #: None for a shell command.
    name: ServiceName | None = None
    #: The words after ``QUBESRPC`` (the descriptor is them joined, as sent).
    words: list[str] = field(default_factory=list)
    descriptor: bytes = b""
    shell_command: str = ""

    @property
    def source(self) -> str:
        return self.words[1]


def parse_dom0_command(command: str) -> Dom0Command:
    """Split COMMAND; :class:`ServiceError` for a malformed ``QUBESRPC`` line (125)."""
    nogui = command.startswith(NOGUI_PREFIX)
    if nogui:
        command = command[len(NOGUI_PREFIX) :]
    if not command.startswith(RPC_WORD):
        return Dom0Command(nogui, shell_command=command)
    rest = command[len(RPC_WORD) :]
    if not rest.startswith(" "):
        raise ServiceError(f"malformed {RPC_WORD} line {command[:80]!r}: no space")
    rest = rest[1:]
    words = rest.split(" ")
    if len(words) < 2:
        raise ServiceError(f"malformed {RPC_WORD} line {command[:80]!r}: no source domain")
    name = split_service_name(words[0])
    if not name.service:
        raise ServiceError(f"malformed {RPC_WORD} line {command[:80]!r}: empty service name")
    if len(name.service.encode("utf-8", "surrogateescape")) > MAX_SERVICE_FILE_NAME:
        raise ServiceError(f"service name is longer than {MAX_SERVICE_FILE_NAME} bytes")
    if not words[1]:
        raise ServiceError(f"malformed {RPC_WORD} line {command[:80]!r}: empty source domain")
    descriptor = rest.encode("utf-8", "surrogateescape") + b"\0"
    return Dom0Command(nogui, name, words, descriptor)


def _check_upstream_syntax(text: str, path: str) -> None:
    """What R4.3's rpc-config reader refuses although TOML accepts it (spec §15.1):
    tables, indented lines, double-quoted strings. The rest is :func:`parse_rpc_config`'s."""
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if line[0] in " \t":
            raise ServiceError(f"{path}:{number}: leading whitespace")
        if stripped.startswith("["):
            raise ServiceError(f"{path}:{number}: sections are not supported")
        _, equals, value = stripped.partition("=")
        if equals and value.strip().startswith('"'):
            raise ServiceError(f"{path}:{number}: strings must be single-quoted")


def load_dom0_rpc_config(name: ServiceName, env: Mapping[str, str], root: DomainRoot) -> RpcConfig:
    """The service's rpc-config, read as R4.3 reads it; ServiceError (125) if invalid."""
    directories = search_path(env, RPC_CONFIG_PATH_ENV, DEFAULT_RPC_CONFIG_PATH)
    path = find_config(name, directories, root)
    if path is None:
        return RpcConfig()
    try:
        with open(path, "rb") as file:
            raw = file.read(MAX_CONFIG_SIZE + 1)
    except OSError as exc:
        raise ServiceError(f"cannot read rpc-config {path}: {exc}") from None
    if len(raw) > MAX_CONFIG_SIZE or b"\0" in raw:
        raise ServiceError(f"rpc-config {path} is too large or holds a NUL byte")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ServiceError(f"rpc-config {path} is not UTF-8: {exc}") from None
    _check_upstream_syntax(text, path)
    return parse_rpc_config(text, path)


def dom0_service_environment(base: Mapping[str, str], command: Dom0Command) -> dict[str, str]:
    """A dom0 service's environment: the agent's rules (spec §7) without QREXEC_AGENT_PID,
    and the requested target as TYPE says (any TYPE but name/keyword sets only the type)."""
    assert command.name is not None
    env = clean_environment(base)
    env.pop("QREXEC_AGENT_PID", None)
    env["QREXEC_REMOTE_DOMAIN"] = command.source
    env["QREXEC_SERVICE_FULL_NAME"] = command.words[0]
    if command.name.argument is not None:
        env["QREXEC_SERVICE_ARGUMENT"] = command.name.argument
    env["QREXEC_REQUESTED_TARGET_TYPE"] = ""
    if len(command.words) == 4:
        target_type, target = command.words[2], command.words[3]
        env["QREXEC_REQUESTED_TARGET_TYPE"] = target_type
        if target_type == "name":
            env["QREXEC_REQUESTED_TARGET"] = target
        elif target_type == "keyword":
            env["QREXEC_REQUESTED_TARGET_KEYWORD"] = target
    return env


@dataclass
class PreparedService:
    """What preparing a call gave: a running process, a connected socket service, a
    "child" that failed at once (``child_code``), or a failure to prepare (``failure``)."""

    config: RpcConfig = field(default_factory=RpcConfig)
    failure: int | None = None
    child_code: int | None = None
    proc: subprocess.Popen[bytes] | None = None
    stdin: socket.socket | None = None
    stdout: socket.socket | None = None
    sock: socket.socket | None = None

    def discard(self) -> None:
        """Close our ends (the service sees EOF); a process is reaped in the background."""
        for end in (self.stdin, self.stdout, self.sock):
            if end is not None:
                end.close()
        if self.proc is not None and self.proc.returncode is None:
            service_io.reap_in_background(self.proc)


async def wait_for_session(source: str, env: Mapping[str, str], root: DomainRoot) -> None:
    """Run ``qubes.WaitForSession`` from the service path (stdin closed, no arguments,
    QREXEC_REMOTE_DOMAIN = ``source``) and wait; its status or absence is only logged."""
    directories = search_path(env, SERVICE_PATH_ENV, DEFAULT_SERVICE_PATH)
    try:
        target = find_service(split_service_name(WAIT_FOR_SESSION_SERVICE), directories, root)
    except ServiceError as exc:
        log.warning("wait-for-session: %s", exc)
        return
    if target.kind is not ServiceKind.EXECUTABLE:
        log.warning("wait-for-session: %s is not an executable", target.path)
        return
    child_env = clean_environment(env)
    child_env.pop("QREXEC_AGENT_PID", None)
    child_env["QREXEC_REMOTE_DOMAIN"] = source
    try:
        proc = subprocess.Popen([target.path], stdin=subprocess.DEVNULL, env=child_env)
    except OSError as exc:
        log.warning("wait-for-session: cannot run %s: %s", target.path, exc)
        return
    code = await service_io.wait_process(proc)
    log.info("%s exited with %d", WAIT_FOR_SESSION_SERVICE, service_io.exit_status(code))


def _spawn(argv: list[str], env: dict[str, str], prepared: PreparedService) -> None:
    """Start the process with socketpairs as stdin/stdout and our stderr; an exec failure
    is a child exiting 125 (127 when the program does not exist), as after a fork."""
    stdin_ours, stdin_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    stdout_ours, stdout_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        prepared.proc = subprocess.Popen(
            argv,
            stdin=stdin_theirs.fileno(),
            stdout=stdout_theirs.fileno(),
            env=env,
            start_new_session=True,
        )
    except OSError as exc:
        log.error("cannot execute %s: %s", argv[0], exc.strerror or exc)
        missing = exc.errno in (errno.ENOENT, errno.ENOTDIR)
        prepared.child_code = int(ExitCode.SERVICE_NOT_FOUND if missing else ExitCode.PROBLEM)
        stdin_ours.close()
        stdout_ours.close()
        return
    finally:
        stdin_theirs.close()
        stdout_theirs.close()
    prepared.stdin, prepared.stdout = stdin_ours, stdout_ours


async def prepare_dom0_service(
    command: str, env: Mapping[str, str], source_name: str, root: DomainRoot | None = None
) -> PreparedService:
    """Step 1 of the module docstring. Never raises for the call's own problems."""
    root = root or DomainRoot.from_env(None, env)
    prepared = PreparedService()
    try:
        parsed = parse_dom0_command(command)
        if parsed.name is None:
            shell_env = dict(env)
            shell_env["QREXEC_REMOTE_DOMAIN"] = source_name
            _spawn([SHELL, "-c", parsed.shell_command], shell_env, prepared)
            return prepared
        if not parsed.nogui:
            prepared.config = load_dom0_rpc_config(parsed.name, env, root)
            if prepared.config.wait_for_session:
                await wait_for_session(parsed.source, env, root)
        directories = search_path(env, SERVICE_PATH_ENV, DEFAULT_SERVICE_PATH)
        target = find_service(parsed.name, directories, root)
        if target.kind is ServiceKind.EXECUTABLE:
            if len(parsed.words) not in (2, 4):
                log.error("%s: %d words after %s", command[:80], len(parsed.words), RPC_WORD)
                prepared.child_code = int(ExitCode.PROBLEM)
                return prepared
            _spawn(list(target.argv), dom0_service_environment(env, parsed), prepared)
            return prepared
        sock = await connect_service_socket(target)
        prepared.sock = sock
        if not prepared.config.skip_service_descriptor and not await service_io.write_fd(
            sock.fileno(), parsed.descriptor
        ):
            raise ServiceError(f"service {target.path} closed before its descriptor")
    except ServiceNotFound as exc:
        log.error("%s", exc)
        prepared.discard()
        prepared.failure = int(ExitCode.SERVICE_NOT_FOUND)
    except ServiceError as exc:
        log.error("%s", exc)
        prepared.discard()
        prepared.failure = int(ExitCode.PROBLEM)
    return prepared


@dataclass(frozen=True, slots=True)
class Dom0CallResult:
    """How a dom0 call ended: ``code`` is the exit code (sent or not; None when the vchan
    never came up); ``prepare_failed`` marks a failure to prepare (its code stands even
    under ``-E``)."""

    code: int | None
    prepare_failed: bool = False


async def _relay_process(channel: service_io.DataChannel, prepared: PreparedService) -> int:
    """The data phase of a started process; its exit code (sent unless the caller left)."""
    proc, stdin, stdout = prepared.proc, prepared.stdin, prepared.stdout
    assert proc is not None and stdin is not None and stdout is not None
    stdin.setblocking(False)
    stdout.setblocking(False)

    async def deliver(views: list[memoryview]) -> bool:
        return await service_io.writev_fd(stdin.fileno(), views)

    def end_input() -> None:
        with contextlib.suppress(OSError):
            stdin.shutdown(socket.SHUT_WR)

    async def take_input() -> None:
        """The caller's STDIN until the vchan ends (which is when this returns); once the
        service has closed its stdin, the rest is dropped (spec §15.1)."""
        await service_io.relay_stdin(channel, deliver, end_input, target_fd=stdin.fileno())

    async def produce() -> int:
        own = frame_pipe(channel.max_chunk) if can_splice(channel.stream) else None
        if own is not None:  # payloads spliced, socket -> our pipe -> vchan
            await pump_spliced(
                channel.stream,
                MsgType.DATA_STDOUT,
                stdout.fileno(),
                channel.max_chunk,
                lambda: channel.trace_first(MsgType.DATA_STDOUT),
                own,
            )
        else:
            while data := await service_io.read_fd(stdout.fileno(), channel.max_chunk):
                await channel.send_data(MsgType.DATA_STDOUT, data)
        await channel.send_eof(MsgType.DATA_STDOUT)
        return service_io.exit_status(await service_io.wait_process(proc))

    caller = asyncio.ensure_future(take_input())
    output = asyncio.ensure_future(produce())
    try:
        await asyncio.wait((caller, output), return_when=asyncio.FIRST_COMPLETED)
        if output.done():
            code = output.result()
            await channel.send_exit(code)
            return code
        log.info("caller closed the data vchan early (dom0 service pid %d)", proc.pid)
        output.cancel()
        with contextlib.suppress(asyncio.CancelledError, TransportError, OSError):
            await output
        stdin.close()
        stdout.close()
        return service_io.exit_status(await service_io.wait_process(proc))
    finally:
        for task in (caller, output):
            task.cancel()
        for task in (caller, output):
            with contextlib.suppress(asyncio.CancelledError, TransportError, OSError):
                await task
        stdin.close()
        stdout.close()


async def serve_dom0_call(
    backend: Backend,
    vm_domid: int,
    port: int,
    command: str,
    env: Mapping[str, str],
    own_version: int,
    *,
    source_name: str,
    connect_timeout: float | None,
    prefix_data: bytes = b"",
    hello_timeout: float | None = None,
    on_data_phase: Callable[[], None] | None = None,
) -> Dom0CallResult:
    """The whole dom0 side of one call (module docstring); never raises for the call's
    or the peer's problems (they are logged)."""
    prepared = await prepare_dom0_service(command, env, source_name)
    try:
        stream = await backend.connect_async(vm_domid, port, timeout=connect_timeout)
    except (TransportError, TimeoutError, OSError) as exc:
        log.error("domain %d did not serve data port %d: %s", vm_domid, port, exc)
        prepared.discard()
        return Dom0CallResult(None)
    except asyncio.CancelledError:
        # The VM's control channel went away before the data phase (docs/decisions.md,
        # "Resource bounds"): the started service sees EOF and is reaped.
        prepared.discard()
        raise
    try:
        try:
            async with asyncio.timeout(hello_timeout):
                peer = await service_io.read_hello(stream)
        except TimeoutError:
            log.warning(
                "domain %d sent no HELLO on data port %d within %g s", vm_domid, port, hello_timeout
            )
            prepared.discard()
            return Dom0CallResult(None)
        version = negotiate(own_version, peer)
        await stream.send(encode(Hello(own_version)))
        if on_data_phase is not None:
            on_data_phase()
        channel = service_io.DataChannel(stream, version)
        await channel.send_eof(MsgType.DATA_STDERR)
        if prepared.failure is not None:
            await channel.send_eof(MsgType.DATA_STDOUT)
            await channel.send_exit(prepared.failure)
            return Dom0CallResult(prepared.failure, prepare_failed=True)
        if prefix_data:
            await channel.send_data(MsgType.DATA_STDOUT, prefix_data)
        if prepared.child_code is not None:
            await channel.send_eof(MsgType.DATA_STDOUT)
            await channel.send_exit(prepared.child_code)
            return Dom0CallResult(prepared.child_code)
        if prepared.sock is not None:
            sock, prepared.sock = prepared.sock, None
            code = await service_io.relay_socket(
                channel,
                sock,
                exit_on_client_eof=prepared.config.exit_on_client_eof,
                exit_on_service_eof=prepared.config.exit_on_service_eof,
                stderr_eof_sent=True,
            )
            return Dom0CallResult(int(ExitCode.OK) if code is None else code)
        return Dom0CallResult(await _relay_process(channel, prepared))
    except (RemoteProtocolError, TransportError, OSError) as exc:
        log.warning("dom0 call from domain %d port %d ended: %s", vm_domid, port, exc)
        prepared.discard()
        return Dom0CallResult(None)
    except asyncio.CancelledError:
        prepared.discard()
        raise
    finally:
        # Wait until what send() buffered has reached the VM: ``qrexec-client -d dom0 -c``
        # ends its event loop right after, which would drop it.
        await stream.aclose()
