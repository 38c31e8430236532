"""The same daemon bytes to Qubes' C agent and to ours: same answers (spec §15.5 to §15.7).

A scripted daemon (:func:`tests.interop.peers.agent_under_test`) drives a fresh agent of
each implementation: it sends a control message, serves the data vchan as dom0's
qrexec-client would, and records everything the agent sends back (data messages with their
payload bytes, in order; the control channel; whether the agent exits; what a socket service
received). Each case also states what spec §15 says, which the C agent must show.

Deliberate differences are listed in :data:`AGENT_DIFFERENCES` (none: the spec asks our
agent to exit where upstream's does) and :data:`TRIGGER_DIFFERENCES`, with the reason.
"""

from __future__ import annotations

import os
import re
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.interop import rawpeer
from tests.interop.peers import AgentRun, agent_under_test, both, exited
from tests.interop.rawpeer import Msg, i32, msg, show, u32
from tests.interop.system import Impl, vm_user, write_executable

pytestmark = [pytest.mark.cpeer, pytest.mark.timeout(120)]

PORT = 513
HELLO4 = (rawpeer.HELLO, u32(4))
STDOUT_EOF = (rawpeer.DATA_STDOUT, b"")
STDERR_EOF = (rawpeer.DATA_STDERR, b"")
TERMINATED = ((rawpeer.CONNECTION_TERMINATED, u32(0, PORT)),)


def exit_code(code: int) -> Msg:
    return (rawpeer.DATA_EXIT_CODE, i32(code))


def failed_to_start(code: int) -> tuple[Msg, ...]:
    """§15.6: a VM agent that cannot start a service sends STDOUT EOF, STDERR EOF, code."""
    return (HELLO4, STDOUT_EOF, STDERR_EOF, exit_code(code))


class SocketService:
    """A unix-socket service file: records what the agent writes; optionally replies."""

    def __init__(self, path: Path, reply: bytes | None) -> None:
        self.received = b""
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(str(path))
        self._server.listen(1)
        self._server.settimeout(20)
        self._reply = reply
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self._server.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(20)
            try:
                while chunk := conn.recv(65536):
                    self.received += chunk
                if self._reply is not None:
                    conn.sendall(self._reply)
            except OSError:
                pass

    def result(self) -> bytes:
        self._thread.join(3)
        self._server.close()
        return self.received


Setup = Callable[[AgentRun], "SocketService | None"]


def no_setup(run: AgentRun) -> None:
    return None


def socket_service(reply: bytes | None = None, config: str | None = None) -> Setup:
    def setup(run: AgentRun) -> SocketService:
        if config is not None:
            (run.rpc_config / "qubes.SocketService").write_text(config)
        return SocketService(run.services / "qubes.SocketService", reply)

    return setup


def tcp_link(target: str) -> Setup:
    def setup(run: AgentRun) -> None:
        os.symlink(target, run.services / "test.Tcp")

    return setup


@dataclass(frozen=True)
class Outcome:
    data: tuple[Msg, ...] | None
    control: tuple[Msg, ...]
    agent_exited: bool
    service_received: bytes | None = None

    def __repr__(self) -> str:
        data = "no data vchan" if self.data is None else f"[{show(list(self.data))}]"
        return (
            f"data={data} control=[{show(list(self.control))}] exited={self.agent_exited} "
            f"service_received={self.service_received!r}"
        )


@dataclass(frozen=True)
class Case:
    name: str
    #: The control message (framed) the daemon sends.
    control: bytes
    qubes: Outcome
    setup: Setup = no_setup
    #: Data messages dom0 sends after its HELLO (e.g. stdin and its EOF).
    stdin: tuple[bytes, ...] = ()
    #: Whether a data vchan is served on PORT.
    data_vchan: bool = True


def call(msg_type: int, command: str) -> bytes:
    return msg(msg_type, u32(0, PORT) + f"{vm_user()}:{command}".encode() + b"\0")


def closed_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on (bound then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


AGENT_EXITS = Outcome(None, (), True)
IGNORED = Outcome(None, (), False)

CASES = (
    # ---- §15.5: JUST_EXEC of a socket service ----
    Case(
        "just-exec socket service writes the descriptor and answers 0",
        call(rawpeer.JUST_EXEC, "QUBESRPC qubes.SocketService a"),
        Outcome((HELLO4, exit_code(0)), TERMINATED, False, b"qubes.SocketService a\0"),
        setup=socket_service(),
    ),
    Case(
        "just-exec socket service with an argument",
        call(rawpeer.JUST_EXEC, "QUBESRPC qubes.SocketService+arg src"),
        Outcome((HELLO4, exit_code(0)), TERMINATED, False, b"qubes.SocketService+arg src\0"),
        setup=socket_service(),
    ),
    Case(
        "just-exec socket service skipping the descriptor",
        call(rawpeer.JUST_EXEC, "QUBESRPC qubes.SocketService a"),
        Outcome((HELLO4, exit_code(0)), TERMINATED, False, b""),
        setup=socket_service(config="skip-service-descriptor = true\n"),
    ),
    # ---- §15.6: failure to start (VM agent: STDOUT EOF, STDERR EOF, code) ----
    Case(
        "service not found",
        call(rawpeer.EXEC_CMDLINE, "QUBESRPC test.Missing dom0"),
        Outcome(failed_to_start(127), TERMINATED, False),
    ),
    Case(
        "/dev/tcp with an empty argument",
        call(rawpeer.EXEC_CMDLINE, "QUBESRPC test.Tcp dom0"),
        Outcome(failed_to_start(125), TERMINATED, False),
        setup=tcp_link("/dev/tcp"),
    ),
    Case(
        "/dev/tcp with no port in the argument",
        call(rawpeer.EXEC_CMDLINE, "QUBESRPC test.Tcp+127.0.0.1 dom0"),
        Outcome(failed_to_start(125), TERMINATED, False),
        setup=tcp_link("/dev/tcp"),
    ),
    Case(
        "/dev/tcp/HOST with an empty argument",
        call(rawpeer.EXEC_CMDLINE, "QUBESRPC test.Tcp dom0"),
        Outcome(failed_to_start(125), TERMINATED, False),
        setup=tcp_link("/dev/tcp/127.0.0.1"),
    ),
    Case(
        "/dev/tcp/::1 with an empty argument (IPv6 without port)",
        call(rawpeer.EXEC_CMDLINE, "QUBESRPC test.Tcp dom0"),
        Outcome(failed_to_start(125), TERMINATED, False),
        setup=tcp_link("/dev/tcp/::1"),
    ),
    Case(
        "/dev/tcp/HOST/PORT with an argument",
        call(rawpeer.EXEC_CMDLINE, "QUBESRPC test.Tcp+x dom0"),
        Outcome(failed_to_start(125), TERMINATED, False),
        setup=tcp_link("/dev/tcp/127.0.0.1/22"),
    ),
    Case(
        "/dev/tcp port with a leading zero",
        call(rawpeer.EXEC_CMDLINE, "QUBESRPC test.Tcp dom0"),
        Outcome(failed_to_start(125), TERMINATED, False),
        setup=tcp_link("/dev/tcp/127.0.0.1/022"),
    ),
    Case(
        "/dev/tcp connection refused",
        call(rawpeer.EXEC_CMDLINE, "QUBESRPC test.Tcp dom0"),
        Outcome(failed_to_start(125), TERMINATED, False),
        setup=lambda run: tcp_link(f"/dev/tcp/127.0.0.1/{closed_port()}")(run),
    ),
    # ---- §15.6: once started, a socket service sends STDERR EOF first, EXIT_CODE 0 last ----
    Case(
        "socket service: STDERR EOF first, exit code 0 last",
        call(rawpeer.EXEC_CMDLINE, "QUBESRPC qubes.SocketService a"),
        Outcome(
            (HELLO4, STDERR_EOF, (rawpeer.DATA_STDOUT, b"ok"), STDOUT_EOF, exit_code(0)),
            TERMINATED,
            False,
            b"qubes.SocketService a\0hi",
        ),
        setup=socket_service(reply=b"ok"),
        stdin=(msg(rawpeer.DATA_STDIN, b"hi"), msg(rawpeer.DATA_STDIN, b"")),
    ),
    # ---- §15.7: the agent exits on these ----
    Case("refused with len 8", msg(rawpeer.SERVICE_REFUSED, b"SOCKET1\0"), AGENT_EXITS),
    Case("exec with len 8", msg(rawpeer.EXEC_CMDLINE, u32(0, PORT)), AGENT_EXITS, data_vchan=False),
    Case("just-exec with len 4", msg(rawpeer.JUST_EXEC, u32(0)), AGENT_EXITS, data_vchan=False),
    Case("service connect with len 8", msg(rawpeer.SERVICE_CONNECT, u32(2, PORT)), AGENT_EXITS),
    Case("unknown message type", msg(0x999, b"x"), AGENT_EXITS),
    # ---- §15.7: ignored ----
    Case(
        "service connect with an ident that is not SOCKET<n>",
        msg(rawpeer.SERVICE_CONNECT, u32(2, PORT) + b"XYZ".ljust(32, b"\0")),
        IGNORED,
        data_vchan=False,
    ),
    Case(
        "service connect to a descriptor that is not open",
        msg(rawpeer.SERVICE_CONNECT, u32(2, PORT) + b"SOCKET999".ljust(32, b"\0")),
        IGNORED,
        data_vchan=False,
    ),
)

#: Case name → (what our agent shows instead, why). None: the spec asks for the same.
AGENT_DIFFERENCES: dict[str, tuple[Outcome, str]] = {}


def run_case(impl: Impl, case: Case, c_bin: Path) -> Outcome:
    with agent_under_test(impl, c_bin) as run:
        service = case.setup(run)
        listener = run.data_server(PORT) if case.data_vchan else None
        run.control.send(case.control)
        data: tuple[Msg, ...] | None = None
        if listener is not None and case.qubes.data is not None:
            conn = run.accept_data(listener)
            conn.send(msg(rawpeer.HELLO, u32(4)))
            for message in case.stdin:
                conn.send(message)
            data = tuple(conn.collect(quiet=5, limit=30, until_closed=True).messages)
        if listener is not None:
            listener.close()
        control = run.control.collect(quiet=1.0)
        gone = exited(run.record, 3) if control.closed else exited(run.record, 0)
        received = service.result() if service is not None else None
        return Outcome(data, tuple(control.messages), gone, received)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_control_message_to_agent(case: Case, c_peer_bin: Path) -> None:
    theirs, ours = both(run_case, case, c_peer_bin)
    assert theirs == case.qubes, f"Qubes' agent: {theirs!r}"
    if case.name in AGENT_DIFFERENCES:
        expected, reason = AGENT_DIFFERENCES[case.name]
        assert ours == expected, f"ours: {ours!r}; listed difference: {reason}"
    else:
        assert ours == theirs, f"ours: {ours!r}\ntheirs: {theirs!r}"


# ---- §15.7: the agent's trigger socket (qrexec-client-vm's side) ----

REQUEST_ID_FIELD = slice(128, 160)
SOCKET_ID = re.compile(rb"SOCKET(\d+)\0")


@dataclass(frozen=True)
class TriggerOutcome:
    """What the daemon got (the request id reduced to its shape), what the client got."""

    to_daemon: tuple[Msg, ...]
    client_got: bytes
    client_closed: bool
    after_client_closed: tuple[Msg, ...] = field(default=())


def normalise(messages: list[Msg], sent: bytes) -> tuple[Msg, ...]:
    """Replace the fd number in a forwarded trigger's request id by ``<n>`` after checking
    that the rest of the payload is what the client sent (§15.7: later bytes stay)."""
    out = []
    for msg_type, payload in messages:
        if msg_type == rawpeer.TRIGGER_SERVICE4:
            field_ = payload[REQUEST_ID_FIELD]
            match = SOCKET_ID.match(field_)
            assert match is not None, payload
            end = match.end()
            kept = field_[end:] == sent[REQUEST_ID_FIELD][end:]
            shape = b"SOCKET<n>\0" + (b"<rest as sent>" if kept else field_[end:])
            payload = payload[:128] + shape + payload[160:]
        out.append((msg_type, payload))
    return tuple(out)


def trigger_payload(request_id: bytes, name: bytes = b"test.Svc+a\0") -> bytes:
    return b"\0" * 64 + b"vm2".ljust(64, b"\0") + request_id.ljust(32, b"\0") + name


@dataclass(frozen=True)
class TriggerCase:
    name: str
    send: bytes
    qubes: TriggerOutcome
    #: What the daemon answers to a forwarded trigger: "connect", "refuse" or None.
    answer: str | None = None


VALID = trigger_payload(b"SOCKET")
#: A request id with bytes after the "SOCKET" NUL: they stay as sent (§15.7).
WITH_JUNK = trigger_payload(b"SOCKET\0\0\0\0\0\0\0\0\0\0junk")


def forwarded(payload: bytes, rest: bytes) -> tuple[Msg, ...]:
    return ((rawpeer.TRIGGER_SERVICE4, payload[:128] + b"SOCKET<n>\0" + rest + payload[160:]),)


TRIGGER_CASES = (
    TriggerCase(
        "trigger3 is closed without a word",
        msg(rawpeer.TRIGGER_SERVICE3, VALID[64:]),
        TriggerOutcome((), b"", True),
    ),
    TriggerCase(
        "trigger4 without a name is closed",
        msg(rawpeer.TRIGGER_SERVICE4, VALID[:160]),
        TriggerOutcome((), b"", True),
    ),
    TriggerCase(
        "trigger4 request id: SOCKET<fd> NUL, later bytes as sent",
        msg(rawpeer.TRIGGER_SERVICE4, WITH_JUNK),
        TriggerOutcome(forwarded(WITH_JUNK, b"<rest as sent>"), b"", False),
    ),
    TriggerCase(
        "trigger4 forwarded, SERVICE_CONNECT answers 8 bytes, close terminates",
        msg(rawpeer.TRIGGER_SERVICE4, VALID),
        TriggerOutcome(
            forwarded(VALID, b"<rest as sent>"),
            u32(2, PORT),
            False,
            ((rawpeer.CONNECTION_TERMINATED, u32(2, PORT)),),
        ),
        answer="connect",
    ),
    TriggerCase(
        "trigger4 forwarded, SERVICE_REFUSED closes the client",
        msg(rawpeer.TRIGGER_SERVICE4, VALID),
        TriggerOutcome(forwarded(VALID, b"<rest as sent>"), b"", True),
        answer="refuse",
    ),
)


def run_trigger_case(impl: Impl, case: TriggerCase, c_bin: Path) -> TriggerOutcome:
    with agent_under_test(impl, c_bin) as run:
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect(str(run.trigger_socket))
        client.sendall(case.send)
        got = run.control.collect(quiet=1.0)
        to_daemon = normalise(got.messages, case.send[8:])
        if case.answer is not None and got.messages:
            request_id = got.messages[0][1][REQUEST_ID_FIELD]
            if case.answer == "connect":
                run.control.send(msg(rawpeer.SERVICE_CONNECT, u32(2, PORT) + request_id))
            else:
                run.control.send(msg(rawpeer.SERVICE_REFUSED, request_id))
        client.settimeout(2)
        received = b""
        closed = False
        try:
            while chunk := client.recv(4096):
                received += chunk
            closed = True
        except ConnectionResetError:  # closed with our request unread
            closed = True
        except TimeoutError:
            pass
        after: tuple[Msg, ...] = ()
        if not closed:
            client.close()
            after = tuple(run.control.collect(quiet=1.0).messages)
        else:
            client.close()
        return TriggerOutcome(to_daemon, received, closed, after)


#: Case name → (check of what our agent shows instead, why). Empty: the trigger socket takes
#: only TRIGGER_SERVICE4, as R4.3's agent (docs/decisions.md; an R4.2 qrexec-client-vm's
#: TRIGGER_SERVICE3 is closed there too).
TRIGGER_DIFFERENCES: dict[str, tuple[Callable[[TriggerOutcome], bool], str]] = {}


@pytest.mark.parametrize("case", TRIGGER_CASES, ids=lambda c: c.name)
def test_trigger_socket(case: TriggerCase, c_peer_bin: Path) -> None:
    theirs, ours = both(run_trigger_case, case, c_peer_bin)
    assert theirs == case.qubes, f"Qubes' agent: {theirs!r}"
    if case.name in TRIGGER_DIFFERENCES:
        check, reason = TRIGGER_DIFFERENCES[case.name]
        assert check(ours), f"ours: {ours!r}; listed difference: {reason}"
    else:
        assert ours == theirs, f"ours: {ours!r}\ntheirs: {theirs!r}"


# ---- §15.7: QREXEC_AGENT_PID in a service ----

SERVICE_PID = '#!/bin/sh\necho "${QREXEC_AGENT_PID-unset} $PPID"\n'


def run_pid_case(impl: Impl, _case: None, c_bin: Path) -> tuple[bool, bool]:
    """(QREXEC_AGENT_PID is the agent's main pid, QREXEC_AGENT_PID is the service's parent)."""
    with agent_under_test(impl, c_bin) as run:
        write_executable(run.services / "test.Pid", SERVICE_PID)
        listener = run.data_server(PORT)
        run.control.send(call(rawpeer.EXEC_CMDLINE, "QUBESRPC test.Pid dom0"))
        conn = run.accept_data(listener)
        conn.send(msg(rawpeer.HELLO, u32(4)) + msg(rawpeer.DATA_STDIN, b""))
        got = conn.collect(quiet=5, limit=30, until_closed=True).messages
        output = b"".join(p for t, p in got if t == rawpeer.DATA_STDOUT)
        agent_pid, parent = output.split()
        return int(agent_pid) == run.record.pid, agent_pid == parent


#: (ours, why) where our agent differs on purpose.
AGENT_PID_DIFFERENCE = (
    (True, True),
    "docs/decisions.md: QREXEC_AGENT_PID is the agent's own pid (calls run in the agent's "
    "event loop, without a per-call process); SIGUSR1 to it works all the same",
)


def test_agent_pid_is_the_per_call_process(c_peer_bin: Path) -> None:
    theirs, ours = both(run_pid_case, None, c_peer_bin)
    # Qubes: a per-call child of the agent, which is the service's parent.
    assert theirs == (False, True)
    expected, reason = AGENT_PID_DIFFERENCE
    assert ours == expected, f"ours: {ours}; listed difference: {reason}"
