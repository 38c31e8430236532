"""``qrexec-client-vm``: call a service in another domain from a VM (spec §4(ii)-(v), §8).

Flow: connect to the agent's trigger socket (``-a``, env ``QREXEC_AGENT_SOCKET``, default
``/var/run/qubes/qrexec-agent``) and send one TRIGGER_SERVICE4 (TRIGGER_SERVICE3 when
``QREXEC_PROTOCOL_VERSION`` caps us at 3 or 2, as an R4.2 client would) with request id
``SOCKET``; the agent puts its own id in and forwards it to dom0, whose policy decides.
The agent then either writes the bare 8-byte exec_params ``{remote domain, port}`` - the
call is allowed - or closes the socket: "Request refused", exit 126. Allowed: become the
vchan **server** of ``(remote domain, port)`` with ``--buffer-size`` rings, exchange
HELLOs and run the caller's side of the data phase (:mod:`.caller`). The trigger socket
stays open for the whole call: closing it is how the agent learns the call is over
(it then sends CONNECTION_TERMINATED).

With a LOCAL_PROGRAM, the program's stdout feeds the service's stdin and the service's
stdout feeds the program's stdin; the service's stderr goes to our stderr. The program
gets ``SAVED_FD_0``/``SAVED_FD_1`` naming copies of our original stdin/stdout (and
``SAVED_FD_2`` when ``PASS_LOCAL_STDERR`` is set; its stderr is ours either way). It is
started only once the call is connected, so a refused call runs nothing locally. Exit
code: the remote code when non-zero, else the program's (spec §4(v)).

**Emulated domains** (several VMs on one host, the testbed): when ``QREXEC_DOMAIN_ROOT``
is set and an absolute LOCAL_PROGRAM exists under that root, the file under the root is
run (``/usr/bin/our_test_add_client`` is ``<root>/usr/bin/our_test_add_client``), the
same rule the agent applies to the program named by a 2011 service file. A path that does
not exist under the root is run as given (``/bin/sh`` stays the host's).

Exit codes: remote (or local) code; 126 refused; 125 any qrexec problem (no agent, broken
protocol, no data connection); 1 the local program cannot start; 2 usage errors.

Runs once per call: blocking, imports lazily, never imports asyncio. Also runs as
``python -m qrexec.client.client_vm``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from qrexec.lazy_logging import configure, get_logger
from qrexec.protocol.constants import SIGNAL_EXIT_BASE, ExitCode

if TYPE_CHECKING:
    import socket
    import subprocess

    from qrexec.backends.base import Backend, BlockingStream
    from qrexec.client.client_vm_args import ClientVmOptions

log = get_logger("qrexec.client_vm")

DOMAIN_ROOT_ENV = "QREXEC_DOMAIN_ROOT"
#: How long we wait for the target's agent to connect the data vchan. The agent itself
#: gives up after 120 s (spec §3.5); a little more here so it always goes first.
DATA_ACCEPT_TIMEOUT = 125.0
#: Local error (spec §8): the local program could not be started.
EXIT_LOCAL_ERROR = 1
#: Usage error.
EXIT_USAGE = 2
REQUEST_ID = b"SOCKET"


class CallRefused(Exception):
    """The agent closed the trigger socket without exec_params: policy said no."""


def resolve_local_program(program: Sequence[str], env: Mapping[str, str]) -> list[str]:
    """LOCAL_PROGRAM as this (possibly emulated) domain sees it (module docstring)."""
    argv = list(program)
    root = env.get(DOMAIN_ROOT_ENV)
    if argv and root and os.path.isabs(argv[0]) and os.path.abspath(root) != "/":
        candidate = os.path.join(os.path.abspath(root), argv[0].lstrip("/"))
        if os.path.exists(candidate):
            argv[0] = candidate
    return argv


def build_trigger(options: ClientVmOptions, version: int) -> bytes:
    """The trigger frame for the agent: TRIGGER_SERVICE4, or 3 below protocol version 4."""
    from qrexec.protocol.constants import PROTOCOL_V4
    from qrexec.protocol.messages import TriggerService3, TriggerService4, encode

    target = options.target.encode("utf-8", "surrogateescape")
    service = options.service.encode("utf-8", "surrogateescape")
    if version >= PROTOCOL_V4:
        return encode(
            TriggerService4(
                source_domain=options.source_qube.encode("utf-8", "surrogateescape"),
                target_domain=target,
                request_id=REQUEST_ID,
                service_name=service,
            )
        )
    return encode(
        TriggerService3(target_domain=target, request_id=REQUEST_ID, service_name=service)
    )


def request_call(options: ClientVmOptions, version: int) -> tuple[socket.socket, int, int]:
    """Ask the agent for the call; the open trigger socket and ``(domain, port)``.

    Raises :class:`CallRefused` when the agent closes the socket instead of answering.
    """
    import socket

    from qrexec.errors import QrexecError
    from qrexec.protocol.framing import read_exec_params

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            sock.connect(options.agent_socket)
        except OSError as exc:
            raise QrexecError(
                f"cannot connect to the qrexec agent at {options.agent_socket}: {exc}"
            ) from None
        try:
            sock.sendall(build_trigger(options, version))
            params = read_exec_params(sock.recv)
        except (ConnectionResetError, BrokenPipeError):
            params = None
    except BaseException:
        sock.close()
        raise
    if params is None:
        sock.close()
        raise CallRefused
    return sock, params[0], params[1]


def save_std_fds(env: Mapping[str, str]) -> list[int]:
    """Copies of our stdin and stdout (and stderr with ``PASS_LOCAL_STDERR``) for the
    local program's ``SAVED_FD_*``.

    Taken first thing, while the lowest descriptors are free, so the numbers are single
    digits: ``/bin/sh`` (dash) cannot redirect to ``>&$SAVED_FD_1`` past fd 9.
    """
    saved = [os.dup(0), os.dup(1)]
    if env.get("PASS_LOCAL_STDERR"):
        saved.append(os.dup(2))
    return saved


class LocalProgram:
    """LOCAL_PROGRAM wired to the call through two pipes."""

    def __init__(self, argv: list[str], env: Mapping[str, str], saved: Sequence[int]) -> None:
        import subprocess

        to_program_r, self.to_program = os.pipe()
        self.from_program, from_program_w = os.pipe()
        child_env = dict(env)
        for number, fd in enumerate(saved):
            child_env[f"SAVED_FD_{number}"] = str(fd)
        try:
            self.proc: subprocess.Popen[bytes] = subprocess.Popen(
                argv,
                stdin=to_program_r,
                stdout=from_program_w,
                env=child_env,
                pass_fds=tuple(saved),
            )
        except OSError:
            os.close(self.to_program)
            os.close(self.from_program)
            raise
        finally:
            os.close(to_program_r)
            os.close(from_program_w)

    def finish(self, stdin_closed: bool) -> int:
        """Close our pipe ends and wait for the program; its exit code.

        The data phase closes the program's stdin at the service's STDOUT EOF
        (``stdin_closed``); otherwise it is closed here.
        """
        if not stdin_closed:
            os.close(self.to_program)
        code = self.proc.wait()
        os.close(self.from_program)
        return SIGNAL_EXIT_BASE - code if code < 0 else code


def run_call(
    options: ClientVmOptions,
    stream: BlockingStream,
    version: int,
    env: Mapping[str, str],
    saved: Sequence[int] = (),
) -> int:
    """The data phase after the handshake: our stdio or the local program; the exit code."""
    from qrexec.client.caller import CallerIO, run_caller

    if not options.local_program:
        stdout_fd = 0 if options.use_stdin_socket else 1
        io = CallerIO(
            stdin_fd=0,
            stdout_fd=stdout_fd,
            stderr_fd=2,
            prefix_data=options.prefix_data,
            filter_stdout=options.filter_stdout,
            filter_stderr=options.filter_stderr,
        )
        return run_caller(stream, version, io)
    argv = resolve_local_program(options.local_program, env)
    try:
        local = LocalProgram(argv, env, saved)
    except OSError as exc:
        print(f"qrexec-client-vm: cannot run {argv[0]}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_LOCAL_ERROR
    io = CallerIO(
        stdin_fd=local.from_program,
        stdout_fd=local.to_program,
        stderr_fd=2,
        prefix_data=options.prefix_data,
        filter_stdout=options.filter_stdout,
        filter_stderr=options.filter_stderr,
    )
    remote = run_caller(stream, version, io)
    own = local.finish(io.stdout_closed)
    return remote if remote != 0 else own


def connect_and_run(options: ClientVmOptions, env: Mapping[str, str]) -> int:
    """Everything after argument parsing; raises QrexecError / CallRefused."""
    from qrexec.backends.select import load_backend
    from qrexec.protocol.negotiation import own_protocol_version

    saved = save_std_fds(env) if options.local_program else []
    try:
        version = own_protocol_version(env)
        backend = load_backend(None, env)
        return _call(options, env, backend, version, saved)
    finally:
        for fd in saved:
            os.close(fd)


def _call(
    options: ClientVmOptions,
    env: Mapping[str, str],
    backend: Backend,
    version: int,
    saved: Sequence[int],
) -> int:
    from qrexec.client.caller import caller_handshake
    from qrexec.errors import QrexecError

    trigger_sock, domain, port = request_call(options, version)
    try:
        listener = backend.listen(
            domain, port, read_min=options.buffer_size, write_min=options.buffer_size
        )
        try:
            stream = listener.accept(timeout=DATA_ACCEPT_TIMEOUT)
        except TimeoutError:
            raise QrexecError(
                f"domain {domain} did not connect the data vchan on port {port}"
                f" within {DATA_ACCEPT_TIMEOUT:g} s"
            ) from None
        finally:
            listener.close()
        try:
            data_version = caller_handshake(stream, version)
            return run_call(options, stream, data_version, env, saved)
        finally:
            stream.close()
    finally:
        trigger_sock.close()


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    from qrexec.client.client_vm_args import USAGE, HelpRequested, parse_args
    from qrexec.errors import QrexecError, UsageError

    environ = dict(os.environ if env is None else env)
    args = sys.argv[1:] if argv is None else list(argv)
    configure(debug=False, format="qrexec-client-vm: %(message)s")
    try:
        options = parse_args(args, environ)
    except HelpRequested:
        sys.stdout.write(USAGE)
        return 0
    except UsageError as exc:
        sys.stderr.write(f"qrexec-client-vm: {exc}\n{USAGE}")
        return EXIT_USAGE
    try:
        return connect_and_run(options, environ)
    except CallRefused:
        print("Request refused", file=sys.stderr)
        return ExitCode.REQUEST_REFUSED
    except (QrexecError, OSError) as exc:
        log.error("%s", exc)
        return ExitCode.PROBLEM


if __name__ == "__main__":
    sys.exit(main())
