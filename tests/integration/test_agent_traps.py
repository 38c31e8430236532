"""Our qrexec-agent driven byte by byte by a fake dom0 daemon (spec §15.5, §15.6, §15.7).

The agent is a real process (test mode, or root in CI) over the socket transport; the
daemon side is :class:`~tests.integration.fake_peers.FakeDaemon`, which sends exactly the
bytes each case needs and checks every byte that comes back: message types, payloads,
their order, exit codes, CONNECTION_TERMINATED, and whether the agent exits.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import struct
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from qrexec.protocol.constants import MsgType
from tests.integration.conftest import Domain, QrexecSystem
from tests.integration.fake_peers import FakeDaemon, Frame, Peer, frame, params

pytestmark = pytest.mark.timeout(120)

STDOUT_EOF = Frame(MsgType.DATA_STDOUT, b"")
STDERR_EOF = Frame(MsgType.DATA_STDERR, b"")


def exit_code(code: int) -> Frame:
    return Frame(MsgType.DATA_EXIT_CODE, struct.pack("<i", code))


def start_c_agent(system: QrexecSystem, program: Path) -> None:
    """Qubes' C qrexec-agent in place of ours, on the same folders (the differential
    suite in ``tests/interop`` runs the scenarios here against both)."""
    from qrexec.sim import processes

    dom = system.domain("vm1", 1)
    env = system.env(
        1,
        {
            "QREXEC_SERVICE_PATH": str(dom.root / "etc/qubes-rpc"),
            "QUBES_RPC_CONFIG_PATH": str(dom.root / "etc/qubes/rpc-config"),
        },
    )
    argv = [str(program), f"--agent-socket={system.base}/agent.vm1.sock", "--no-fork-server"]
    record, proc = processes.spawn("agent", "vm1", argv, env, system.logs / "agent.vm1.log")
    system.records.append(record)
    dom.agent, dom.agent_proc = record, proc


class AgentWorld:
    def __init__(self, system: QrexecSystem, c_agent: Path | None = None) -> None:
        self.system = system
        self.vm: Domain = system.domain("vm1", 1)
        if c_agent is None:
            system.start_agent("vm1", 1)
        else:
            start_c_agent(system, c_agent)
        self.daemon = FakeDaemon(system.vchan_dir, 1)
        self.control = self.daemon.connect()
        self.trigger_path = system.base / "agent.vm1.sock"

    @property
    def user(self) -> str:
        return self.system.user

    def rpc(self, service: str, source: str = "src") -> bytes:
        return f"{self.user}:QUBESRPC {service} {source}".encode()

    def terminated(self, port: int = 513, domain: int = 0) -> None:
        got = self.control.read()
        assert got == Frame(MsgType.CONNECTION_TERMINATED, params(domain, port)), got

    def agent_exit(self, timeout: float = 20) -> int:
        proc = self.vm.agent_proc
        assert proc is not None
        return proc.wait(timeout)

    def agent_alive(self) -> bool:
        proc = self.vm.agent_proc
        assert proc is not None
        return proc.poll() is None

    def trigger_client(self) -> Peer:
        """A qrexec-client-vm stand-in connected to the agent's trigger socket."""
        from qrexec.sim.processes import wait_for

        wait_for(self.trigger_path.exists, 30, what="the trigger socket")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(self.trigger_path))
        return Peer(sock)


@contextlib.contextmanager
def agent_world(c_agent: Path | None = None) -> Iterator[AgentWorld]:
    # A short base folder: the fake peers bind vchan sockets without long-path help.
    base = Path(tempfile.mkdtemp(prefix="qa", dir="/tmp"))
    system = QrexecSystem(base)
    try:
        yield AgentWorld(system, c_agent)
    finally:
        system.stop_all()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def world() -> Iterator[AgentWorld]:
    with agent_world() as made:
        yield made


def test_vm_start_failure_sends_stdout_eof_first(world: AgentWorld) -> None:
    """§15.6: not found → STDOUT EOF, STDERR EOF, EXIT_CODE 127, then the vchan closes."""
    data = world.daemon.call(MsgType.EXEC_CMDLINE, world.rpc("no.Such+arg"))
    assert data.read_until_close() == [STDOUT_EOF, STDERR_EOF, exit_code(127)]
    world.terminated()


def test_wrong_word_count_is_125(world: AgentWorld) -> None:
    world.vm.write_service("test.Ok", "#!/bin/sh\necho hi\n")
    data = world.daemon.call(MsgType.EXEC_CMDLINE, world.rpc("test.Ok+", "src extra"))
    assert data.read_until_close() == [STDOUT_EOF, STDERR_EOF, exit_code(125)]
    world.terminated()


@pytest.mark.parametrize(
    ("link", "arg"),
    [
        ("/dev/tcp/", ""),
        ("/dev/tcp", ""),  # missing host
        ("/dev/tcp", "127.0.0.1"),  # missing port
        ("/dev/tcp", "127_0_0_1+22"),  # `_` in the host
        ("/dev/tcp/127.0.0.1", ""),  # HOST without a port argument
        ("/dev/tcp/::1", ""),
        ("/dev/tcp/127.0.0.1/22", "x"),  # HOST/PORT with an argument
        ("/dev/tcp/127.0.0.1", "022"),
        ("/dev/tcp/127.0.0.1", "65536"),
        ("/dev/tcp/localhost", "22"),  # not numeric
        ("REFUSED", ""),  # a port nobody listens on
    ],
)
def test_dev_tcp_errors_are_125_stdout_eof_first(world: AgentWorld, link: str, arg: str) -> None:
    if link == "REFUSED":
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            link = f"/dev/tcp/127.0.0.1/{probe.getsockname()[1]}"
    folder = world.vm.root / "etc/qubes-rpc"
    folder.mkdir(parents=True, exist_ok=True)
    os.symlink(link, folder / "test.Tcp")
    data = world.daemon.call(MsgType.EXEC_CMDLINE, world.rpc(f"test.Tcp+{arg}"))
    assert data.read_until_close() == [STDOUT_EOF, STDERR_EOF, exit_code(125)]
    world.terminated()


def test_tcp_service_once_started_sends_stderr_eof_first(world: AgentWorld) -> None:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    folder = world.vm.root / "etc/qubes-rpc"
    folder.mkdir(parents=True, exist_ok=True)
    os.symlink("/dev/tcp", folder / "test.Tcp")
    data = world.daemon.call(MsgType.EXEC_CMDLINE, world.rpc(f"test.Tcp+127.0.0.1+{port}"))
    conn, _ = server.accept()
    with conn, server:
        descriptor = b""
        while not descriptor.endswith(b"\0"):
            descriptor += conn.recv(100)
        assert descriptor == f"test.Tcp+127.0.0.1+{port} src\0".encode()
        assert data.read() == STDERR_EOF
        conn.sendall(b"pong")
    data.send(frame(MsgType.DATA_STDIN, b""))
    assert data.read_until_close() == [
        Frame(MsgType.DATA_STDOUT, b"pong"),
        STDOUT_EOF,
        exit_code(0),
    ]
    world.terminated()


def test_exec_failure_in_the_child(world: AgentWorld) -> None:
    """§15.6: a missing interpreter is ENOENT from execve → 127, EXIT_CODE last."""
    world.vm.write_service("test.Interp", "#!/nonexistent/interpreter\n")
    data = world.daemon.call(MsgType.EXEC_CMDLINE, world.rpc("test.Interp+"))
    frames = data.read_until_close()
    assert frames[-1] == exit_code(127)
    eofs = [f for f in frames[:-1] if not f.payload]
    assert sorted(f.type for f in eofs) == [MsgType.DATA_STDOUT, MsgType.DATA_STDERR]
    # Only the shell of a root agent's wrapper may say something, on stderr.
    assert all(f.type == MsgType.DATA_STDERR for f in frames[:-1] if f.payload)
    world.terminated()


def test_just_exec_exec_failure_answers_like_exec(world: AgentWorld) -> None:
    """§15.6 for JUST_EXEC: a missing interpreter is 127, not 0 or 125. A root agent runs
    the program through its ``sh -l`` wrapper, which starts fine (0 at once, as upstream's
    forked child does); the wrapper's own 127 then goes to nobody."""
    world.vm.write_service("test.Interp", "#!/nonexistent/interpreter\n")
    data = world.daemon.call(MsgType.JUST_EXEC, world.rpc("test.Interp+"))
    expected = 0 if os.geteuid() == 0 else 127
    assert data.read_until_close() == [exit_code(expected)]
    world.terminated()


def test_not_executable_is_a_start_failure(world: AgentWorld) -> None:
    world.vm.write_file("etc/qubes-rpc/test.Text", "echo hi\n", 0o644)
    data = world.daemon.call(MsgType.EXEC_CMDLINE, world.rpc("test.Text+"))
    assert data.read_until_close() == [STDOUT_EOF, STDERR_EOF, exit_code(125)]
    world.terminated()


def test_full_name_as_sent_and_dangling_symlinks_skipped(world: AgentWorld) -> None:
    """§7: QREXEC_SERVICE_FULL_NAME is the word as sent; a dangling link is absent."""
    folder = world.vm.root / "etc/qubes-rpc"
    folder.mkdir(parents=True, exist_ok=True)
    os.symlink("/nonexistent/target", folder / "test.Env+a")
    world.vm.write_service(
        "test.Env",
        '#!/bin/sh\necho "full=$QREXEC_SERVICE_FULL_NAME arg=${QREXEC_SERVICE_ARGUMENT-unset}"\n',
    )
    for sent, expected in (
        ("test.Env+a", b"full=test.Env+a arg=a\n"),
        ("test.Env", b"full=test.Env arg=unset\n"),
        ("test.Env+", b"full=test.Env+ arg=\n"),
    ):
        data = world.daemon.call(MsgType.EXEC_CMDLINE, world.rpc(sent))
        data.send(frame(MsgType.DATA_STDIN, b""))
        frames = data.read_until_close()
        assert Frame(MsgType.DATA_STDOUT, expected) in frames, frames
        assert frames[-1] == exit_code(0)
        world.terminated()


# ---- §15.5: JUST_EXEC of a socket service ----


class SocketService:
    """A unix-socket service in the VM's service folder recording what it receives."""

    def __init__(self, world: AgentWorld, name: str) -> None:
        folder = world.vm.root / "etc/qubes-rpc"
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / name
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(self.path))
        self.sock.listen(1)
        self.received: list[bytes] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        self.sock.settimeout(30)
        conn, _ = self.sock.accept()
        with conn:
            data = b""
            while chunk := conn.recv(65536):
                data += chunk
            self.received.append(data)

    def result(self) -> bytes:
        self.thread.join(30)
        (data,) = self.received
        return data


def test_just_exec_socket_service(world: AgentWorld) -> None:
    service = SocketService(world, "test.Sock")
    data = world.daemon.call(MsgType.JUST_EXEC, world.rpc("test.Sock+a"))
    exact = data.read_bytes(12)
    assert exact == bytes.fromhex("93 01 00 00 04 00 00 00 00 00 00 00")
    assert data.is_closed()
    assert service.result() == b"test.Sock+a src\0"
    world.terminated()


def test_just_exec_socket_service_without_descriptor(world: AgentWorld) -> None:
    service = SocketService(world, "test.Sock")
    world.vm.write_file("etc/qubes/rpc-config/test.Sock", "skip-service-descriptor = true\n")
    data = world.daemon.call(MsgType.JUST_EXEC, world.rpc("test.Sock"))
    assert data.read_until_close() == [exit_code(0)]
    assert service.result() == b""
    world.terminated()


def test_just_exec_socket_failures(world: AgentWorld) -> None:
    data = world.daemon.call(MsgType.JUST_EXEC, world.rpc("test.Missing+"))
    assert data.read_until_close() == [exit_code(127)]
    world.terminated()
    folder = world.vm.root / "etc/qubes-rpc"
    folder.mkdir(parents=True, exist_ok=True)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(str(folder / "test.Dead"))  # bound, never listening: refused
        data = world.daemon.call(MsgType.JUST_EXEC, world.rpc("test.Dead+"), port=514)
        assert data.read_until_close() == [exit_code(125)]
    world.terminated(514)


# ---- §15.7: what makes the agent exit ----


@pytest.mark.parametrize(
    "bad",
    [
        frame(MsgType.SERVICE_REFUSED, b"SOCKET5".ljust(31, b"\0")),
        frame(MsgType.SERVICE_REFUSED, b"SOCKET5".ljust(33, b"\0")),
        frame(MsgType.EXEC_CMDLINE, params(0, 513)),
        frame(MsgType.EXEC_CMDLINE, b""),
        frame(MsgType.JUST_EXEC, params(0, 513)),
        frame(MsgType.SERVICE_CONNECT, params(0, 513)),
        frame(MsgType.HELLO, struct.pack("<I", 4)),
        frame(MsgType.DATA_STDOUT, b"x"),
        frame(MsgType.CONNECTION_TERMINATED, params(0, 513)),
        frame(0x999, b""),
    ],
    ids=lambda raw: f"type{raw[0] | raw[1] << 8:#x}-len{len(raw) - 8}",
)
def test_agent_exits_on_daemon_violations(world: AgentWorld, bad: bytes) -> None:
    world.control.send(bad)
    assert world.agent_exit() == 1
    assert world.control.is_closed()


def test_exec_last_byte_is_forced_to_nul(world: AgentWorld) -> None:
    """§15.7: the terminator of EXEC_CMDLINE is not checked; the last byte becomes NUL."""
    world.vm.write_service("test.Src", '#!/bin/sh\necho "src=$QREXEC_REMOTE_DOMAIN"\n')
    server = world.daemon.serve_data(513)
    world.control.send(frame(MsgType.EXEC_CMDLINE, params(0, 513) + world.rpc("test.Src+", "srcX")))
    data = server.accept()
    assert data.read() is not None
    data.send(frame(MsgType.HELLO, struct.pack("<I", 4)))
    data.send(frame(MsgType.DATA_STDIN, b""))
    frames = data.read_until_close()
    assert Frame(MsgType.DATA_STDOUT, b"src=src\n") in frames
    world.terminated()
    assert world.agent_alive()


# ---- §15.7: the trigger socket and SERVICE_CONNECT with SOCKET<n> ----


def trigger4(
    name: bytes, target: bytes = b"vm2", ident: bytes = b"SOCKET".ljust(32, b"\0")
) -> bytes:
    payload = b"src".ljust(64, b"\0") + target.ljust(64, b"\0") + ident + name
    return frame(MsgType.TRIGGER_SERVICE4, payload)


def forwarded_ident(world: AgentWorld, sent: bytes) -> tuple[int, bytes]:
    """Read the forwarded trigger: check it byte for byte; the descriptor and raw ident."""
    got = world.control.read()
    assert got is not None and got.type == MsgType.TRIGGER_SERVICE4, got
    ident = got.payload[128:160]
    text = ident.split(b"\0", 1)[0]
    assert text.startswith(b"SOCKET") and text[6:].isdigit(), ident
    sent_payload = sent[8:]
    # Only the start of the request id field changed: SOCKET<n> + NUL.
    end = 128 + len(text) + 1
    assert got.payload[:128] == sent_payload[:128]
    assert got.payload[128:end] == text + b"\0"
    assert got.payload[end:] == sent_payload[end:]
    return int(text[6:]), ident


def test_service_connect_writes_8_bytes_then_terminates(world: AgentWorld) -> None:
    client = world.trigger_client()
    sent = trigger4(b"test.Svc+arg\0", ident=b"SOCKET\0\0\0\0\0\0\0\0\0\0\0\0xyz".ljust(32, b"Q"))
    client.send(sent)
    fd, ident = forwarded_ident(world, sent)
    assert ident.endswith(b"xyz" + b"Q" * (32 - 21))
    # A short ident, not re-padded, with a leading zero and trailing bytes after the
    # number, names the same client (upstream reads the number C-style).
    world.control.send(frame(MsgType.SERVICE_CONNECT, params(7, 600) + f"SOCKET0{fd}x\0".encode()))
    assert client.read_bytes(8) == params(7, 600)
    # A second SERVICE_CONNECT for it is ignored (a deliberate difference).
    world.control.send(frame(MsgType.SERVICE_CONNECT, params(8, 601) + f"SOCKET{fd}\0".encode()))
    assert client.silent_for(0.5)
    assert world.control.silent_for(0.5)
    client.close()
    assert world.control.read() == Frame(MsgType.CONNECTION_TERMINATED, params(7, 600))


def test_service_connect_bad_idents_are_ignored(world: AgentWorld) -> None:
    client = world.trigger_client()
    sent = trigger4(b"test.Svc\0")
    client.send(sent)
    fd, _ = forwarded_ident(world, sent)
    for bad in (b"SOCKETX", b"SOCK", b"SOCKET-1", f"SOCKET{fd + 100}".encode(), b""):
        world.control.send(frame(MsgType.SERVICE_CONNECT, params(7, 600) + bad.ljust(32, b"\0")))
    assert client.silent_for(0.5)
    assert world.control.silent_for(0.5)
    world.control.send(frame(MsgType.SERVICE_REFUSED, f"SOCKET{fd}".encode().ljust(32, b"\0")))
    assert client.is_closed()
    assert world.control.silent_for(0.5)
    assert world.agent_alive()


@pytest.mark.parametrize(
    "bad",
    [
        frame(
            MsgType.TRIGGER_SERVICE3, b"vm2".ljust(64, b"\0") + b"SOCKET".ljust(32, b"\0") + b"s\0"
        ),
        frame(
            MsgType.TRIGGER_SERVICE, b"s".ljust(64, b"\0") + b"vm2".ljust(32, b"\0") + b"\0" * 32
        ),
        frame(MsgType.TRIGGER_SERVICE4, b"\0" * 160),  # len 160
        frame(MsgType.TRIGGER_SERVICE4, b"\0" * 160 + b"x" * 65001),  # len 65161
        frame(MsgType.HELLO, struct.pack("<I", 4)),
    ],
    ids=["trigger3", "trigger2", "len160", "len65161", "hello"],
)
def test_trigger_socket_takes_only_trigger4(world: AgentWorld, bad: bytes) -> None:
    client = world.trigger_client()
    client.send(bad)
    assert client.is_closed()
    assert world.control.silent_for(0.5)


@pytest.mark.parametrize("name", [b"\0", b"a\0a\0", b"no-terminator", b"x" * 64999 + b"\0"])
def test_trigger_socket_checks_nothing_else(world: AgentWorld, name: bytes) -> None:
    client = world.trigger_client()
    sent = trigger4(name, target=b"t" * 64)
    client.send(sent)
    fd, _ = forwarded_ident(world, sent)
    world.control.send(frame(MsgType.SERVICE_REFUSED, f"SOCKET{fd}".encode().ljust(32, b"\0")))
    assert client.is_closed()


def test_v3_daemon_gets_trigger3_with_the_same_bytes() -> None:
    base = Path(tempfile.mkdtemp(prefix="qa", dir="/tmp"))
    system = QrexecSystem(base)
    try:
        system.start_agent("vm1", 1)
        daemon = FakeDaemon(system.vchan_dir, 1)
        control = daemon.connect(version=3)
        from qrexec.sim.processes import wait_for

        path = base / "agent.vm1.sock"
        wait_for(path.exists, 30, what="the trigger socket")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(path))
        sent = trigger4(b"test.Svc+x\0", target=b"vm2")
        sock.sendall(sent)
        got = control.read()
        assert got is not None and got.type == MsgType.TRIGGER_SERVICE3
        assert got.payload[:64] == b"vm2".ljust(64, b"\0")
        assert got.payload[64:70] == b"SOCKET" and got.payload[96:] == b"test.Svc+x\0"
        sock.close()
    finally:
        system.stop_all()
        shutil.rmtree(base, ignore_errors=True)


# ---- §15.6: ordering once started ----


class ScriptedSocketService:
    """A socket service whose conversation the test steps through from its thread."""

    def __init__(self, world: AgentWorld, name: str) -> None:
        folder = world.vm.root / "etc/qubes-rpc"
        folder.mkdir(parents=True, exist_ok=True)
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(folder / name))
        self.server.listen(1)

    def accept(self) -> Peer:
        self.server.settimeout(30)
        conn, _ = self.server.accept()
        self.server.close()
        return Peer(conn)


def read_descriptor(service: Peer) -> bytes:
    got = b""
    while not got.endswith(b"\0"):
        one = service.read_bytes(1)
        assert one is not None
        got += one
    return got


def test_socket_service_exit_waits_for_both_directions(world: AgentWorld) -> None:
    service = ScriptedSocketService(world, "test.Sock")
    data = world.daemon.call(MsgType.EXEC_CMDLINE, world.rpc("test.Sock"))
    conn = service.accept()
    # The descriptor is the text after "QUBESRPC " as sent: no `+` is added.
    assert read_descriptor(conn) == b"test.Sock src\0"
    assert data.read() == STDERR_EOF
    conn.send(b"out")
    conn.sock.shutdown(socket.SHUT_WR)
    assert data.read() == Frame(MsgType.DATA_STDOUT, b"out")
    assert data.read() == STDOUT_EOF
    # The service's EOF alone does not end the call: the caller's STDIN is still open.
    assert data.silent_for(0.5)
    data.send(frame(MsgType.DATA_STDIN, b"in") + frame(MsgType.DATA_STDIN, b""))
    assert conn.read_bytes(2) == b"in"
    assert conn.is_closed()
    assert data.read_until_close() == [exit_code(0)]
    world.terminated()


def test_exit_on_client_eof(world: AgentWorld) -> None:
    service = ScriptedSocketService(world, "test.Sock")
    world.vm.write_file("etc/qubes/rpc-config/test.Sock", "exit-on-client-eof = true\n")
    data = world.daemon.call(MsgType.EXEC_CMDLINE, world.rpc("test.Sock+"))
    conn = service.accept()
    assert read_descriptor(conn) == b"test.Sock+ src\0"
    assert data.read() == STDERR_EOF
    data.send(frame(MsgType.DATA_STDIN, b""))
    assert data.read_until_close() == [STDOUT_EOF, exit_code(0)]
    conn.close()
    world.terminated()


def test_exit_on_service_eof(world: AgentWorld) -> None:
    service = ScriptedSocketService(world, "test.Sock")
    world.vm.write_file("etc/qubes/rpc-config/test.Sock", "exit-on-service-eof = true\n")
    data = world.daemon.call(MsgType.EXEC_CMDLINE, world.rpc("test.Sock+"))
    conn = service.accept()
    assert read_descriptor(conn) == b"test.Sock+ src\0"
    assert data.read() == STDERR_EOF
    conn.sock.shutdown(socket.SHUT_WR)
    assert data.read_until_close() == [STDOUT_EOF, exit_code(0)]
    conn.close()
    world.terminated()


def test_executable_exit_code_comes_last(world: AgentWorld) -> None:
    world.vm.write_service("test.Both", "#!/bin/sh\necho out\necho err >&2\nexit 7\n")
    data = world.daemon.call(MsgType.EXEC_CMDLINE, world.rpc("test.Both+"))
    data.send(frame(MsgType.DATA_STDIN, b""))
    frames = data.read_until_close()
    assert frames[-1] == exit_code(7)
    by_type: dict[int, list[bytes]] = {MsgType.DATA_STDOUT: [], MsgType.DATA_STDERR: []}
    for one in frames[:-1]:
        by_type[one.type].append(one.payload)
    assert b"".join(by_type[MsgType.DATA_STDOUT]) == b"out\n"
    assert by_type[MsgType.DATA_STDOUT][-1] == b""
    assert by_type[MsgType.DATA_STDERR][-1] == b""
    assert b"err\n" in b"".join(by_type[MsgType.DATA_STDERR])
    world.terminated()
