"""qrexec-client-vm's LOCAL_PROGRAM (spec §15.4), driven by fake peers byte by byte.

The test is both the VM's agent (a trigger socket answering with 8 bytes, or closing) and
the service side of the data vchan (vchan client from domain 2 of the client's server).
Every program is a ``/bin/sh`` script, which is dash on Debian: nothing here depends on
bash.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from qrexec.backends.socket import SocketBackend
from qrexec.protocol.constants import MsgType
from qrexec.sim.testbed import clean_environment
from tests.integration.fake_peers import (
    HELLO_V4,
    FakeTriggerAgent,
    Frame,
    Peer,
    connect_vchan,
    exit_frame,
    frame,
    params,
)

pytestmark = pytest.mark.timeout(120)

CALLER = 1
SERVICE = 2
PORT = 513
STDIN_EOF = Frame(MsgType.DATA_STDIN, b"")


class Call:
    """One qrexec-client-vm run against fake peers."""

    #: The qrexec-client-vm to run: ours, or (differential suite) Qubes' C one.
    c_client: Path | None = None

    def __init__(self, base: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.base = base
        self.vchan = base / "vchan"
        self.vchan.mkdir(exist_ok=True)
        self.agent = FakeTriggerAgent(base / "agent.sock")
        full_env = clean_environment()
        full_env.update(
            QREXEC_TRANSPORT="socket",
            VCHAN_SOCKET_DIR=str(self.vchan),
            VCHAN_DOMAIN=str(CALLER),
            QREXEC_AGENT_SOCKET=str(base / "agent.sock"),
        )
        full_env.update(env or {})
        argv = [sys.executable, "-m", "qrexec.client.client_vm"]
        if self.c_client is not None:
            argv = [str(self.c_client), f"--agent-socket={base / 'agent.sock'}"]
        self.proc = subprocess.Popen(
            [*argv, *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=full_env,
            cwd=base,
        )
        self.trigger = self.agent.accept()
        header = self.trigger.read_bytes(8)
        assert header is not None
        msg_type, length = struct.unpack("<II", header)
        assert msg_type == MsgType.TRIGGER_SERVICE4
        self.trigger_payload = self.trigger.read_bytes(length)

    def allow(self) -> Peer:
        """Answer the 8 bytes, connect the data vchan as the service side, HELLOs done."""
        self.trigger.send(params(SERVICE, PORT))
        data = connect_vchan(SocketBackend(SERVICE, self.vchan), CALLER, PORT)
        data.send(HELLO_V4)
        hello = data.read()
        assert hello is not None and hello.type == MsgType.HELLO
        return data

    def finish(self, timeout: float = 60) -> tuple[int, bytes, bytes]:
        out, err = self.proc.communicate(timeout=timeout)
        self.agent.close()
        return self.proc.returncode, out, err


@pytest.fixture
def base() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="qv", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def script(base: Path, name: str, body: str) -> str:
    path = base / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return str(path)


def read_stdin(data: Peer) -> bytes:
    """The caller's STDIN bytes up to its STDIN EOF (no other type may come)."""
    got = b""
    while True:
        one = data.read()
        assert one is not None and one.type == MsgType.DATA_STDIN, one
        if not one.payload:
            return got
        got += one.payload


def test_refused_call_never_starts_the_program(base: Path) -> None:
    marker = base / "started"
    prog = script(base, "prog", f"touch {marker}\n")
    call = Call(base, "vm2", "test.Svc", prog)
    call.trigger.close()
    code, _, err = call.finish()
    assert (code, err.strip()) == (126, b"Request refused")
    assert not marker.exists()


def test_program_starts_on_the_answer_without_waiting_for_the_data_vchan(base: Path) -> None:
    marker = base / "started"
    prog = script(base, "prog", f"touch {marker}\n")
    call = Call(base, "vm2", "test.Svc", prog)
    call.trigger.send(params(SERVICE, PORT))
    deadline = time.monotonic() + 30
    while not marker.exists():
        assert time.monotonic() < deadline, "the program did not start before the vchan"
        time.sleep(0.02)
    data = connect_vchan(SocketBackend(SERVICE, call.vchan), CALLER, PORT)
    data.send(HELLO_V4)
    assert data.read() is not None
    assert read_stdin(data) == b""
    data.send(exit_frame(0))
    assert call.finish()[0] == 0


def test_stdio_env_and_argv0(base: Path) -> None:
    prog = script(
        base,
        "prog",
        "stat -L -c %F /proc/self/fd/0 /proc/self/fd/1\n"
        'echo "pid=$QREXEC_AGENT_PID 0=${SAVED_FD_0-unset} 1=${SAVED_FD_1-unset}'
        ' 2=${SAVED_FD_2-unset}"\n'
        'echo to-saved-stdout >&"$SAVED_FD_1"\n'
        "echo to-stderr >&2\n"
        "tr '\\0' ' ' < /proc/$$/cmdline; echo\n",
    )
    call = Call(base, "vm2", "test.Svc", "/bin/sh", prog, "a b")
    data = call.allow()
    sent = read_stdin(data).decode()
    data.send(exit_frame(0))
    code, out, err = call.finish()
    lines = sent.splitlines()
    assert lines[:2] == ["socket", "socket"]
    pid, fd0, fd1, fd2 = lines[2].split()
    assert pid == f"pid={call.proc.pid}"
    assert fd0 != "0=unset" and fd1 != "1=unset" and fd2 == "2=unset"
    # argv[0] is the basename of the path as given.
    assert lines[3] == f"sh {prog} a b "
    assert (code, out) == (0, b"to-saved-stdout\n")
    assert b"to-stderr\n" in err


@pytest.mark.parametrize("value", ["", "1"])
def test_pass_local_stderr_even_empty(base: Path, value: str) -> None:
    prog = script(base, "prog", 'echo "${SAVED_FD_2-unset}"; echo saved >&"$SAVED_FD_2"\n')
    call = Call(base, "vm2", "test.Svc", prog, env={"PASS_LOCAL_STDERR": value})
    data = call.allow()
    assert read_stdin(data).strip().isdigit()
    data.send(exit_frame(0))
    code, _, err = call.finish()
    assert code == 0 and b"saved\n" in err


@pytest.mark.parametrize("program", ["sh", "./missing", "/nonexistent/prog"])
def test_exec_failure_exits_255(base: Path, program: str) -> None:
    # "sh": no PATH search; the path is taken as given, relative to the cwd.
    call = Call(base, "vm2", "test.Svc", program)
    data = call.allow()
    assert read_stdin(data) == b""
    data.send(exit_frame(0))
    code, _, err = call.finish()
    assert code == 255
    assert b"cannot execute" in err


def test_flow_between_program_and_service(base: Path) -> None:
    """Remote STDOUT → program stdin, its EOF → shutdown; program stdout → STDIN;
    remote STDERR → our stderr; exit: the program's status when the remote code is 0."""
    prog = script(base, "prog", "cat; echo done; exit 3\n")
    call = Call(base, "vm2", "test.Svc", prog)
    data = call.allow()
    data.send(frame(MsgType.DATA_STDOUT, b"hello\n"))
    data.send(frame(MsgType.DATA_STDERR, b"remote-err\n"))
    data.send(frame(MsgType.DATA_STDOUT, b""))
    assert read_stdin(data) == b"hello\ndone\n"
    data.send(frame(MsgType.DATA_STDERR, b""))
    data.send(exit_frame(0))
    code, out, err = call.finish()
    assert (code, out) == (3, b"")
    assert b"remote-err\n" in err


def test_remote_code_wins_when_not_zero(base: Path) -> None:
    prog = script(base, "prog", "exit 3\n")
    call = Call(base, "vm2", "test.Svc", prog)
    data = call.allow()
    assert read_stdin(data) == b""
    data.send(exit_frame(5))
    assert call.finish()[0] == 5


def test_vchan_closed_without_exit_code_is_255(base: Path) -> None:
    prog = script(base, "prog", "exit 0\n")
    call = Call(base, "vm2", "test.Svc", prog)
    data = call.allow()
    assert read_stdin(data) == b""
    data.close()
    assert call.finish()[0] == 255


def test_sigusr1_single_socket_mode(base: Path) -> None:
    """After SIGUSR1 the program's fd 0 carries both ways; STDIN EOF when it exits."""
    prog = script(
        base,
        "prog",
        'kill -USR1 "$QREXEC_AGENT_PID"\n'
        "echo via-fd0 >&0\n"
        "read line\n"
        'echo "got $line" >&0\n'
        "exit 4\n",
    )
    call = Call(base, "vm2", "test.Svc", prog)
    data = call.allow()
    first = data.read()
    assert first == Frame(MsgType.DATA_STDIN, b"via-fd0\n"), first
    data.send(frame(MsgType.DATA_STDOUT, b"hello\n"))
    assert read_stdin(data) == b"got hello\n"
    data.send(exit_frame(0))
    code, _, err = call.finish()
    assert code == 4, err


def test_sigusr1_is_one_shot_and_survivable(base: Path) -> None:
    prog = script(
        base,
        "prog",
        'kill -USR1 "$QREXEC_AGENT_PID"; kill -USR1 "$QREXEC_AGENT_PID"\necho one >&0\n',
    )
    call = Call(base, "vm2", "test.Svc", prog)
    data = call.allow()
    assert read_stdin(data) == b"one\n"
    data.send(exit_frame(0))
    assert call.finish()[0] == 0


def test_stdin_eof_at_once_when_exit_code_comes_first(base: Path) -> None:
    # The program waits for input that never comes; the exit code alone ends the call.
    # Then its stdin reads EOF (upstream would wait forever here), and what it writes
    # afterwards must not kill it with SIGPIPE: its status is the call's exit code.
    prog = script(base, "prog", "read x; echo late; echo late-err >&2; exit 6\n")
    call = Call(base, "vm2", "test.Svc", prog)
    data = call.allow()
    data.send(exit_frame(0))
    assert data.read() == STDIN_EOF
    code, _, err = call.finish()
    assert code == 6
    assert b"late-err\n" in err


def test_trigger_bytes(base: Path) -> None:
    call = Call(base, "-s", "q" * 70, "$" + "t" * 70, "svc+arg", "/bin/true")
    payload = call.trigger_payload
    assert payload == (
        b"q" * 63 + b"\0" + b"@" + b"t" * 62 + b"\0" + b"SOCKET".ljust(32, b"\0") + b"svc+arg\0"
    )
    call.trigger.close()
    assert call.finish()[0] == 126
    assert os.path.exists(call.agent.path)
