"""``qrexec-client -d dom0 -c REQID,SRC,SRCID COMMAND``: Qubes' C client and ours (spec §15.1).

The client completes a VM → dom0 call. A scripted peer plays both other parties: the VM's
daemon socket ``qrexec.<SRCID>`` (HELLO, the SERVICE_CONNECT request, the {SRCID, port}
answer) and the calling VM's end of the data vchan (its server, HELLO first, stdin). The
same script runs against each client; compared are the request bytes, every data message
the client sends (consecutive data chunks of one stream joined, as chunking is the pipes'
business), what a socket service received, and the client's exit code.
"""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from qrexec.backends.socket import SocketBackend, SocketListener, SocketStream
from qrexec.errors import TransportError
from tests.interop import rawpeer
from tests.interop.peers import both
from tests.interop.rawpeer import Msg, i32, msg, show, u32
from tests.interop.system import Impl, InteropSystem, short_temp_dir, write_executable

pytestmark = [pytest.mark.cpeer, pytest.mark.timeout(120)]

#: How long the scripted VM waits at most for the client's data connection (it stops as soon
#: as the client exits; generous, for loaded machines; the client's own limit
#: is 10 s, and it connects only after the service is prepared).
ACCEPT_TIMEOUT = 30
SRC_ID = 1
PORT = 513
REQ = b"SOCKET9"

SERVICE_ENV = """#!/bin/sh
echo "arg=$1 remote=$QREXEC_REMOTE_DOMAIN full=$QREXEC_SERVICE_FULL_NAME"
echo "type=$QREXEC_REQUESTED_TARGET_TYPE target=${QREXEC_REQUESTED_TARGET-unset}"
echo "keyword=${QREXEC_REQUESTED_TARGET_KEYWORD-unset} pid=${QREXEC_AGENT_PID-unset}"
cat
exit 6
"""

STDERR_EOF = (rawpeer.DATA_STDERR, b"")
STDOUT_EOF = (rawpeer.DATA_STDOUT, b"")


def out(data: bytes) -> Msg:
    return (rawpeer.DATA_STDOUT, data)


def code(value: int) -> Msg:
    return (rawpeer.DATA_EXIT_CODE, i32(value))


def coalesce(messages: list[Msg]) -> tuple[Msg, ...]:
    """Join consecutive non-empty chunks of the same data stream."""
    result: list[Msg] = []
    for msg_type, payload in messages:
        if (
            result
            and payload
            and msg_type in (rawpeer.DATA_STDOUT, rawpeer.DATA_STDERR)
            and result[-1][0] == msg_type
            and result[-1][1]
        ):
            result[-1] = (msg_type, result[-1][1] + payload)
        else:
            result.append((msg_type, payload))
    return tuple(result)


@dataclass(frozen=True)
class Outcome:
    request: Msg | None
    data: tuple[Msg, ...]
    exit_code: int
    service_received: bytes | None = None

    def __repr__(self) -> str:
        return (
            f"request={self.request!r} data=[{show(list(self.data))}] "
            f"exit={self.exit_code} service_received={self.service_received!r}"
        )


@dataclass(frozen=True)
class Case:
    name: str
    command: str
    qubes: Outcome
    options: tuple[str, ...] = ()
    #: Data the VM sends after its HELLO (stdin and its EOF by default).
    stdin: tuple[bytes, ...] = (msg(rawpeer.DATA_STDIN, b"in\n"), msg(rawpeer.DATA_STDIN, b""))
    rpc_config: str | None = None
    socket_reply: bytes | None = None


REQUEST = (rawpeer.SERVICE_CONNECT, u32(0, 0) + REQ.ljust(32, b"\0"))
HELLO = (rawpeer.HELLO, u32(4))


def ran(data: bytes, status: int) -> Outcome:
    """Started: STDERR EOF first (dom0 never forwards stderr), output, STDOUT EOF, code."""
    output = (out(data),) if data else ()
    return Outcome(REQUEST, (HELLO, STDERR_EOF, *output, STDOUT_EOF, code(status)), status)


def failed(status: int) -> Outcome:
    """§15.1: could not prepare the service: STDERR EOF, STDOUT EOF, then the code."""
    return Outcome(REQUEST, (HELLO, STDERR_EOF, STDOUT_EOF, code(status)), status)


def env_lines(arg: str, full: str, type_: str, target: str, keyword: str) -> bytes:
    return (
        f"arg={arg} remote=vm1 full={full}\ntype={type_} target={target}\n"
        f"keyword={keyword} pid=unset\nin\n"
    ).encode()


CASES = (
    Case(
        "two words",
        "QUBESRPC test.Env+x vm1",
        ran(env_lines("x", "test.Env+x", "", "unset", "unset"), 6),
    ),
    Case(
        "four words, target by name",
        "QUBESRPC test.Env+x vm1 name dom0",
        ran(env_lines("x", "test.Env+x", "name", "dom0", "unset"), 6),
    ),
    Case(
        "four words, target keyword",
        "QUBESRPC test.Env vm1 keyword adminvm",
        ran(env_lines("", "test.Env", "keyword", "unset", "adminvm"), 6),
    ),
    Case("three words", "QUBESRPC test.Env+x vm1 name", ran(b"", 125)),
    Case("five words", "QUBESRPC test.Env+x vm1 name dom0 extra", ran(b"", 125)),
    Case("service not found", "QUBESRPC test.Missing vm1 name dom0", failed(127)),
    Case("shell command", "echo hi $QREXEC_REMOTE_DOMAIN", ran(b"hi vm1\n", 0)),
    Case("DEFAULT: is a shell command", "DEFAULT:QUBESRPC test.Env vm1", ran(b"", 127)),
    Case(
        "prefix data goes first, as STDOUT",
        "cat",
        ran(b"prefixin\n", 0),
        options=("-p", "prefix"),
    ),
    Case(
        "invalid rpc-config",
        "QUBESRPC test.Env+x vm1 name dom0",
        failed(125),
        rpc_config="wait-for-session = 2\n",
    ),
    Case(
        "socket service gets the words after QUBESRPC as descriptor",
        "QUBESRPC qubes.SocketService+a vm1 name dom0",
        Outcome(
            REQUEST,
            (HELLO, STDERR_EOF, out(b"ok"), STDOUT_EOF, code(0)),
            0,
            b"qubes.SocketService+a vm1 name dom0\0in\n",
        ),
        socket_reply=b"ok",
    ),
)


class FakeDaemonSocket:
    """The VM's daemon socket as the client sees it: HELLO(3), one request, its answer."""

    def __init__(self, path: Path) -> None:
        self.request: Msg | None = None
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(str(path))
        self._server.listen(1)
        self._server.settimeout(30)
        self._conn: socket.socket | None = None
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self._server.accept()
        except OSError:
            return
        self._conn = conn
        peer = rawpeer.RawConn.of_socket(conn)
        conn.sendall(msg(rawpeer.HELLO, u32(3)))
        try:
            peer.expect(rawpeer.HELLO)
            self.request = peer.read(20)
        except (AssertionError, TimeoutError):
            return
        conn.sendall(msg(rawpeer.SERVICE_CONNECT, u32(SRC_ID, PORT)))

    def close(self) -> None:
        self._thread.join(5)
        if self._conn is not None:
            self._conn.close()
        self._server.close()


class SocketService:
    def __init__(self, path: Path, reply: bytes) -> None:
        self.received = b""
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(str(path))
        self._server.listen(1)
        self._server.settimeout(20)
        self._thread = threading.Thread(target=self._serve, args=(reply,), daemon=True)
        self._thread.start()

    def _serve(self, reply: bytes) -> None:
        try:
            conn, _ = self._server.accept()
        except OSError:
            return
        with conn:
            try:
                while chunk := conn.recv(65536):
                    self.received += chunk
                conn.sendall(reply)
            except OSError:
                pass

    def result(self) -> bytes:
        self._thread.join(3)
        self._server.close()
        return self.received


def accept_while_running(
    listener: SocketListener, proc: subprocess.Popen[bytes]
) -> SocketStream | None:
    """The client's data connection; None once the client has exited without one."""
    deadline = time.monotonic() + ACCEPT_TIMEOUT
    while time.monotonic() < deadline:
        try:
            return listener.accept(0.2)
        except TimeoutError:
            if proc.poll() is not None:
                return None
    return None


def run_case(impl: Impl, case: Case, c_bin: Path) -> Outcome:
    with short_temp_dir() as base:
        system = InteropSystem(base, c_bin)
        services = system.dom0_root / "qubes-rpc"
        write_executable(services / "test.Env", SERVICE_ENV)
        config = system.dom0_root / "rpc-config"
        config.mkdir(parents=True, exist_ok=True)
        if case.rpc_config is not None:
            (config / "test.Env+x").write_text(case.rpc_config)
        service = (
            SocketService(services / "qubes.SocketService", case.socket_reply)
            if case.socket_reply is not None
            else None
        )
        daemon = FakeDaemonSocket(system.socket_dir / f"qrexec.{SRC_ID}")
        listener = SocketBackend(SRC_ID, system.vchan_dir).listen(0, PORT)
        argv = system.client_argv(
            impl, "dom0", case.command, *case.options, "-c", f"{REQ.decode()},vm1,{SRC_ID}"
        )
        log = (base / "client.log").open("wb")
        proc = subprocess.Popen(
            argv, env=system.dom0_env(), stdin=subprocess.DEVNULL, stdout=log, stderr=log
        )
        data: tuple[Msg, ...] = ()
        try:
            stream = accept_while_running(listener, proc)
            if stream is not None:
                conn = rawpeer.RawConn(stream.recv, stream.send)
                conn.send(msg(rawpeer.HELLO, u32(4)))
                for message in case.stdin:
                    try:
                        conn.send(message)
                    except TransportError:
                        # The dom0 end may finish without waiting for our STDIN (spec
                        # §15.1); what it sent before is still read below.
                        break
                data = coalesce(conn.collect(quiet=5, limit=30, until_closed=True).messages)
            status = proc.wait(40)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
            listener.close()
            daemon.close()
        received = service.result() if service is not None else None
        return Outcome(daemon.request, data, status, received)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_dom0_end_of_a_vm_call(case: Case, c_peer_bin: Path) -> None:
    theirs, ours = both(run_case, case, c_peer_bin)
    assert theirs == case.qubes, f"Qubes' client: {theirs!r}"
    assert ours == theirs, f"ours: {ours!r}\ntheirs: {theirs!r}"


@pytest.mark.parametrize(
    "connect",
    [",vm1,1", "x" * 32 + ",vm1,1", "id,dom0,1", "id,vm1,0", "id,vm1,abc", "id,vm1,99999999999"],
)
def test_usage_errors_exit_1(connect: str, c_peer_bin: Path) -> None:
    def run(impl: Impl, args: str, c_bin: Path) -> int:
        with short_temp_dir() as base:
            system = InteropSystem(base, c_bin)
            argv = system.client_argv(impl, "dom0", "QUBESRPC test.Env vm1", "-c", args)
            result = subprocess.run(argv, env=system.dom0_env(), capture_output=True, timeout=30)
            return result.returncode

    theirs, ours = both(run, connect, c_peer_bin)
    assert theirs == 1
    assert ours == theirs
