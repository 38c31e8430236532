"""``qrexec-client-vm``: call a service in another domain from a VM (spec §4(ii)-(v), §8).

Flow: connect to the agent's trigger socket (``-a``, env ``QREXEC_AGENT_SOCKET``, default
``/var/run/qubes/qrexec-agent``) and send one TRIGGER_SERVICE4 (as R4.3's client does,
whatever ``QREXEC_PROTOCOL_VERSION`` caps the data vchan at) with request id ``SOCKET``;
the agent puts its own id in and forwards it to dom0, whose policy decides.
The agent then either writes the bare 8-byte exec_params ``{remote domain, port}`` - the
call is allowed - or closes the socket: "Request refused", exit 126. Allowed: become the
vchan **server** of ``(remote domain, port)`` with ``--buffer-size`` rings, exchange
HELLOs and run the caller's side of the data phase (:mod:`.caller`). The trigger socket
stays open for the whole call: closing it is how the agent learns the call is over
(it then sends CONNECTION_TERMINATED).

With a LOCAL_PROGRAM (:mod:`.client_vm_local`, spec §15.4), the program is started as
soon as the agent answers, before the data vchan exists, with its stdin and stdout on
socketpairs: its stdout feeds the service's stdin, the service's stdout feeds its stdin,
the service's stderr goes to our stderr. It gets ``QREXEC_AGENT_PID`` (our pid; SIGUSR1
switches to single-socket mode) and ``SAVED_FD_*``. Exit code: the remote code when
non-zero, else the program's; 255 when the vchan closed without an exit code.

**Emulated domains** (several VMs on one host, the testbed): when ``QREXEC_DOMAIN_ROOT``
is set and an absolute LOCAL_PROGRAM exists under that root, the file under the root is
run (``/usr/bin/our_test_add_client`` is ``<root>/usr/bin/our_test_add_client``), the
same rule the agent applies to the program named by a 2011 service file. A path that does
not exist under the root is run as given (``/bin/sh`` stays the host's).

Exit codes: remote (or local) code; 126 refused; 125 any qrexec problem (no agent, broken
protocol, no data connection); 255 the local program cannot be executed; 2 usage errors.

Runs once per call: blocking, imports lazily, never imports asyncio. Also runs as
``python -m qrexec.client.client_vm``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence

from qrexec import trace
from qrexec.lazy_logging import configure, get_logger
from qrexec.protocol.constants import ExitCode

TYPE_CHECKING = False  # typing is not imported at run time (lean start-up)

if TYPE_CHECKING:
    import socket

    from qrexec.backends.base import Backend, BlockingStream
    from qrexec.client.client_vm_args import ClientVmOptions
    from qrexec.client.client_vm_local import LocalProgram

log = get_logger("qrexec.client_vm")

DOMAIN_ROOT_ENV = "QREXEC_DOMAIN_ROOT"
#: How long we wait for the target's agent to connect the data vchan. The agent itself
#: gives up after 120 s (spec §3.5); a little more here so it always goes first.
DATA_ACCEPT_TIMEOUT = 125.0
#: Usage error.
EXIT_USAGE = 2
REQUEST_ID = b"SOCKET"
#: Target and source fields hold 64 bytes with their NUL.
DOMAIN_FIELD_MAX = 63


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


def build_trigger(options: ClientVmOptions) -> bytes:
    """The TRIGGER_SERVICE4 frame for the agent (R4.3 sends this one type, spec §15.7).

    TARGET and ``--source-qube`` are silently cut to 63 bytes, as upstream's client does;
    the agent converts the trigger to what its control channel negotiated.
    """
    from qrexec.protocol.messages import TriggerService4, encode

    return encode(
        TriggerService4(
            source_domain=_field(options.source_qube),
            target_domain=_field(options.target),
            request_id=REQUEST_ID,
            service_name=options.service.encode("utf-8", "surrogateescape"),
        )
    )


def _field(value: str) -> bytes:
    """A domain-name field's value: at most 63 bytes, leaving room for the NUL."""
    return value.encode("utf-8", "surrogateescape")[:DOMAIN_FIELD_MAX]


def request_call(options: ClientVmOptions) -> tuple[socket.socket, int, int]:
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
            sock.sendall(build_trigger(options))
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


def run_call(
    options: ClientVmOptions,
    stream: BlockingStream,
    version: int,
    local: LocalProgram | None = None,
) -> int:
    """The data phase after the handshake: our stdio or the local program; the exit code."""
    from qrexec.client.caller import CallerIO, run_caller

    if local is None:
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
    io = CallerIO(
        stdin_fd=local.stdout_sock.fileno(),
        stdout_fd=local.stdin_sock.fileno(),
        stderr_fd=2,
        prefix_data=options.prefix_data,
        filter_stdout=options.filter_stdout,
        filter_stderr=options.filter_stderr,
        next_input=local.next_input,
    )
    remote = run_caller(stream, version, io)
    own = local.finish()
    return remote if remote != 0 else own


def connect_and_run(options: ClientVmOptions, env: Mapping[str, str]) -> int:
    """Everything after argument parsing; raises QrexecError / CallRefused."""
    from qrexec.backends.select import load_backend
    from qrexec.client.client_vm_local import save_std_fds
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

    trigger_sock, domain, port = request_call(options)
    if trace.ON:
        trace.point(
            "client.port",
            call=trace.CLI_CALL,
            vchan=trace.vchan_key(backend.own_domain, domain, port),
        )
    try:
        local = None
        if options.local_program:
            from qrexec.client import client_vm_local

            local = client_vm_local.start(
                resolve_local_program(options.local_program, env), env, saved
            )
        try:
            stream = _accept_data(options, backend, domain, port)
        except BaseException:
            if local is not None:
                local.abandon()
            raise
        if trace.ON:
            trace.point("client.vchan_connected", call=trace.CLI_CALL)
        try:
            data_version = caller_handshake(stream, version)
            return run_call(options, stream, data_version, local)
        finally:
            stream.close()
    finally:
        trigger_sock.close()


def _accept_data(
    options: ClientVmOptions, backend: Backend, domain: int, port: int
) -> BlockingStream:
    """Serve ``(domain, port)`` and take the service side's connection."""
    from qrexec.errors import QrexecError

    listener = backend.listen(
        domain, port, read_min=options.buffer_size, write_min=options.buffer_size
    )
    try:
        return listener.accept(timeout=DATA_ACCEPT_TIMEOUT)
    except TimeoutError:
        raise QrexecError(
            f"domain {domain} did not connect the data vchan on port {port}"
            f" within {DATA_ACCEPT_TIMEOUT:g} s"
        ) from None
    finally:
        listener.close()


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    from qrexec.client.client_vm_args import USAGE, HelpRequested, parse_args
    from qrexec.errors import QrexecError, UsageError

    if trace.ON:
        trace.set_program("qrexec-client-vm")
        trace.point("client.start", call=trace.CLI_CALL)
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
    from qrexec.client.process_exit import exit_now

    exit_now(main())
