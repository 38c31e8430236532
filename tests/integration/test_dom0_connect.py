"""``qrexec-client -d dom0 -c REQID,SRCNAME,SRCID COMMAND`` at the byte level (spec §15.1,
§15.6 dom0 side), driven by a fake source daemon and a fake qrexec-client-vm.

Every case asserts the exact reply stream the VM sees after HELLOs (types, payloads,
order; adjacent data chunks merged), the bytes sent to the daemon socket, and the exit
code. Services are ``/bin/sh`` scripts that behave the same under dash and bash.
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from qrexec.daemon.clients import bind_unix
from qrexec.protocol.constants import MsgType
from qrexec.protocol.messages import Data, ExecParams, ExitStatus, Hello, Message, encode
from tests.integration.conftest import QrexecSystem
from tests.integration.dom0_peers import (
    PORT,
    FakeSourceDaemon,
    FakeVmCaller,
    eof,
    exit_code,
    frame,
    stdin,
)

pytestmark = pytest.mark.timeout(90)

SRCID = 5
REQ = "REQ1"
HELLO4 = frame(MsgType.HELLO, struct.pack("<I", 4))
ERR_EOF = eof(MsgType.DATA_STDERR)
OUT_EOF = eof(MsgType.DATA_STDOUT)

ENV_SERVICE = """#!/bin/sh
echo "$1|$QREXEC_REMOTE_DOMAIN|$QREXEC_SERVICE_FULL_NAME|$QREXEC_REQUESTED_TARGET_TYPE\
|${QREXEC_REQUESTED_TARGET-unset}|${QREXEC_REQUESTED_TARGET_KEYWORD-unset}\
|${QREXEC_SERVICE_ARGUMENT-unset}|${QREXEC_AGENT_PID-unset}"
cat
exit 3
"""


def out(data: bytes) -> Data:
    return Data(MsgType.DATA_STDOUT, data)


def reply(data: bytes, code: int) -> list[Message]:
    """What the VM sees for a service that printed ``data`` and exited ``code``."""
    body: list[Message] = [out(data)] if data else []
    return [
        Hello(4),
        Data(MsgType.DATA_STDERR, b""),
        *body,
        Data(MsgType.DATA_STDOUT, b""),
        ExitStatus(code),
    ]


@dataclass
class Call:
    proc: subprocess.Popen[bytes]
    daemon: FakeSourceDaemon
    vm: FakeVmCaller

    def finish(self, timeout: float = 60) -> tuple[int, bytes]:
        try:
            _, err = self.proc.communicate(timeout=timeout)
        finally:
            self.vm.close()
        return self.proc.returncode, err


class Dom0:
    """dom0's service and rpc-config folders, and a way to run ``-d dom0 -c``."""

    def __init__(self, system: QrexecSystem, program: list[str] | None = None) -> None:
        self.system = system
        #: The qrexec-client to run (ours by default; the interop suite passes R4.3's).
        self.program = program or [sys.executable, "-m", "qrexec.client.cli"]
        self.services = system.base / "dom0-rpc"
        self.configs = system.base / "dom0-rpc-config"
        self.services.mkdir()
        self.configs.mkdir()
        self._procs: list[subprocess.Popen[bytes]] = []

    def env(self) -> dict[str, str]:
        return self.system.env(
            0,
            {
                "QREXEC_SERVICE_PATH": str(self.services),
                "QUBES_RPC_CONFIG_PATH": str(self.configs),
            },
        )

    def service(self, name: str, text: str) -> Path:
        path = self.services / name
        path.write_text(text)
        path.chmod(0o755)
        return path

    def config(self, name: str, data: bytes) -> Path:
        path = self.configs / name
        path.write_bytes(data)
        return path

    def argv(self, command: str, *options: str, connect: str | None = None) -> list[str]:
        return [
            *self.program,
            "-d",
            "dom0",
            "-c",
            connect or f"{REQ},vm5,{SRCID}",
            *options,
            command,
        ]

    def start(
        self,
        command: str,
        *options: str,
        connect: str | None = None,
        daemon_reply: bytes | None = None,
        close_after_reply: bool = False,
    ) -> Call:
        daemon = FakeSourceDaemon(
            self.system.socket_dir, SRCID, daemon_reply, close_after_reply=close_after_reply
        )
        proc = subprocess.Popen(
            self.argv(command, *options, connect=connect),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=self.env(),
        )
        self._procs.append(proc)
        return Call(proc, daemon, FakeVmCaller(self.system.vchan_dir, SRCID))

    def call(self, command: str, *options: str, input: bytes = b"") -> tuple[int, bytes, Call]:
        """A whole call: the VM sends ``input`` and STDIN EOF; (exit, raw reply, call)."""
        call = self.start(command, *options)
        call.vm.accept()
        call.vm.send((stdin(input) if input else b"") + stdin(b""))
        raw = call.vm.read_all()
        code, _ = call.finish()
        return code, raw, call

    def stop(self) -> None:
        for proc in self._procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.fixture
def dom0(qrexec_system: QrexecSystem) -> Iterator[Dom0]:
    helper = Dom0(qrexec_system)
    try:
        yield helper
    finally:
        helper.stop()


# ---- usage ----


@pytest.mark.parametrize(
    "connect,options",
    [
        (f",vm5,{SRCID}", ()),
        (f"{'R' * 32},vm5,{SRCID}", ()),
        (f"{REQ},dom0,{SRCID}", ()),
        (f"{REQ},vm5,0", ()),
        (f"{REQ},vm5,0x0", ()),
        (f"{REQ},vm5,five", ()),
        (f"{REQ},vm5,08", ()),
        (f"{REQ},vm5,2147483648", ()),
        (f"{REQ},vm5", ()),
        (f"{REQ},vm5,{SRCID}", ("-e",)),
        (f"{REQ},vm5,{SRCID}", ("-l", "cat")),
    ],
)
def test_usage_errors_exit_1(dom0: Dom0, connect: str, options: tuple[str, ...]) -> None:
    result = subprocess.run(
        dom0.argv("QUBESRPC test.Echo vm5", *options, connect=connect),
        capture_output=True,
        env=dom0.env(),
        timeout=30,
        check=False,
    )
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith(b"qrexec-client: ")
    assert not any(dom0.system.socket_dir.iterdir())


@pytest.mark.parametrize("srcid_text", ["0x5", "05", "5"])
def test_srcid_is_read_like_strtol_base_0(dom0: Dom0, srcid_text: str) -> None:
    dom0.service("test.Echo", ENV_SERVICE)
    call = dom0.start("QUBESRPC test.Echo vm5", connect=f"{REQ},vm5,{srcid_text}")
    call.vm.accept()
    call.vm.send(stdin(b""))
    call.vm.read_all()
    assert call.finish()[0] == 3


# ---- the daemon socket and the whole call ----


@pytest.mark.parametrize("no_exit_code", [False, True])
def test_executable_call_bytes_and_environment(dom0: Dom0, no_exit_code: bool) -> None:
    dom0.service("test.Echo", ENV_SERVICE)
    options = ("-E",) if no_exit_code else ()
    code, raw, call = dom0.call("QUBESRPC test.Echo+a vm5 name dom0", *options, input=b"in\n")
    assert call.daemon.client_hello == frame(MsgType.HELLO, struct.pack("<I", 3))
    assert call.daemon.request == frame(
        MsgType.SERVICE_CONNECT, struct.pack("<II", 0, 0) + REQ.encode().ljust(32, b"\0")
    )
    assert len(call.daemon.request) == 8 + 40
    # The VM's HELLO is read first; ours follows; STDERR EOF is the first data message.
    assert raw[:16] == HELLO4 + ERR_EOF[:4]
    assert raw[12:20] == ERR_EOF
    assert call.vm.messages() == reply(b"a|vm5|test.Echo+a|name|dom0|unset|a|unset\nin\n", 3)
    assert code == (0 if no_exit_code else 3)
    assert call.daemon.closed_by_client.wait(10)


@pytest.mark.parametrize(
    "command,line",
    [
        ("QUBESRPC test.Echo vm5", b"|vm5|test.Echo||unset|unset|unset|unset"),
        ("QUBESRPC test.Echo+ vm5", b"|vm5|test.Echo+||unset|unset||unset"),
        (
            "QUBESRPC test.Echo vm5 keyword adminvm",
            b"|vm5|test.Echo|keyword|unset|adminvm|unset|unset",
        ),
        ("QUBESRPC test.Echo vm5 other x", b"|vm5|test.Echo|other|unset|unset|unset|unset"),
    ],
)
def test_target_type_words(dom0: Dom0, command: str, line: bytes) -> None:
    dom0.service("test.Echo", ENV_SERVICE)
    code, _, call = dom0.call(command)
    assert call.vm.messages() == reply(line + b"\n", 3)
    assert code == 3


@pytest.mark.parametrize("command", ["QUBESRPC test.Echo vm5 name", "QUBESRPC test.Echo a b c d"])
@pytest.mark.parametrize("no_exit_code", [False, True])
def test_wrong_word_count_is_a_child_exiting_125(
    dom0: Dom0, command: str, no_exit_code: bool
) -> None:
    dom0.service("test.Echo", ENV_SERVICE)
    code, raw, _ = dom0.call(command, *(("-E",) if no_exit_code else ()))
    assert raw == HELLO4 + ERR_EOF + OUT_EOF + exit_code(125)
    assert code == (0 if no_exit_code else 125)


@pytest.mark.parametrize(
    "command",
    [
        "QUBESRPC",
        "QUBESRPCtest.Echo vm5",
        "QUBESRPC test.Echo",
        "QUBESRPC test.Echo ",
        "QUBESRPC  vm5",
        "QUBESRPC +arg vm5",
        f"QUBESRPC {'a' * 256} vm5",
    ],
)
@pytest.mark.parametrize("no_exit_code", [False, True])
def test_malformed_rpc_line_gets_the_125_sequence(
    dom0: Dom0, command: str, no_exit_code: bool
) -> None:
    """Upstream dies of SIGSEGV here; we fail to prepare (docs/decisions.md)."""
    dom0.service("test.Echo", ENV_SERVICE)
    code, raw, _ = dom0.call(command, *(("-E",) if no_exit_code else ()))
    assert raw == HELLO4 + ERR_EOF + OUT_EOF + exit_code(125)
    assert code == 125


@pytest.mark.parametrize("no_exit_code", [False, True])
def test_missing_service_gets_the_127_sequence(dom0: Dom0, no_exit_code: bool) -> None:
    code, raw, _ = dom0.call("QUBESRPC no.Such+x vm5", *(("-E",) if no_exit_code else ()))
    assert raw == HELLO4 + ERR_EOF + OUT_EOF + exit_code(127)
    assert code == 127


def test_shell_command_runs_under_bash(dom0: Dom0) -> None:
    code, _, call = dom0.call('echo "$QREXEC_REMOTE_DOMAIN|${BASH_VERSION:+bash}"; exit 7')
    assert call.vm.messages() == reply(b"vm5|bash\n", 7)
    assert code == 7


@pytest.mark.parametrize("no_exit_code", [False, True])
def test_user_prefixed_rpc_is_a_shell_command(dom0: Dom0, no_exit_code: bool) -> None:
    dom0.service("test.Echo", ENV_SERVICE)
    options = ("-E",) if no_exit_code else ()
    code, raw, _ = dom0.call("DEFAULT:QUBESRPC test.Echo vm5", *options)
    assert raw == HELLO4 + ERR_EOF + OUT_EOF + exit_code(127)
    assert code == (0 if no_exit_code else 127)


def test_prefix_data_follows_stderr_eof_as_stdout(dom0: Dom0) -> None:
    dom0.service("test.Echo", "#!/bin/sh\necho svc\n")
    code, raw, call = dom0.call("QUBESRPC test.Echo vm5", "-p", "PRE")
    assert raw[: 20 + 11] == HELLO4 + ERR_EOF + frame(MsgType.DATA_STDOUT, b"PRE")
    assert call.vm.messages() == reply(b"PREsvc\n", 0)
    assert code == 0


# ---- daemon answers ----


@pytest.mark.parametrize(
    "daemon_reply",
    [
        b"",
        encode(ExecParams(MsgType.SERVICE_CONNECT, SRCID, PORT))[:6],
        frame(MsgType.SERVICE_CONNECT, struct.pack("<II", SRCID, PORT) + b"\0" * 32),
        encode(ExecParams(MsgType.EXEC_CMDLINE, SRCID, PORT)),
    ],
    ids=["eof", "short", "len-40", "other-type"],
)
def test_bad_daemon_answer_exits_125_before_any_vchan(dom0: Dom0, daemon_reply: bytes) -> None:
    marker = dom0.system.base / "ran"
    dom0.service("test.Echo", f"#!/bin/sh\ntouch {marker}\n")
    call = dom0.start("QUBESRPC test.Echo vm5", daemon_reply=daemon_reply, close_after_reply=True)
    code, _ = call.finish()
    assert code == 125
    assert not marker.exists()


def test_vchan_connect_timeout_exits_125(dom0: Dom0) -> None:
    dom0.service("test.Echo", ENV_SERVICE)
    call = dom0.start("QUBESRPC test.Echo vm5", "-w", "1")
    code, _ = call.finish()
    assert code == 125


# ---- rpc-config ----


WAIT_SERVICE = """#!/bin/sh
sleep 0.3
echo "$QREXEC_REMOTE_DOMAIN|$#|$(cat)|${QREXEC_AGENT_PID-unset}" > "$0.ran"
exit 9
"""


def test_wait_for_session_runs_qubes_waitforsession_first(dom0: Dom0) -> None:
    waiter = dom0.service("qubes.WaitForSession", WAIT_SERVICE)
    dom0.service("test.Echo", f"#!/bin/sh\ncat {waiter}.ran\n")
    dom0.config("test.Echo", b"wait-for-session = true\n")
    code, _, call = dom0.call("QUBESRPC test.Echo+x vm7 name dom0")
    assert call.vm.messages() == reply(b"vm7|0||unset\n", 0)
    assert code == 0


def test_wait_for_session_without_the_service_goes_on(dom0: Dom0) -> None:
    dom0.service("test.Echo", "#!/bin/sh\necho ok\n")
    dom0.config("test.Echo", b"wait-for-session = 1\n")
    code, _, call = dom0.call("QUBESRPC test.Echo vm5")
    assert call.vm.messages() == reply(b"ok\n", 0)
    assert code == 0


def test_nogui_skips_rpc_config_and_wait_for_session(dom0: Dom0) -> None:
    waiter = dom0.service("qubes.WaitForSession", WAIT_SERVICE)
    dom0.service("test.Echo", f"#!/bin/sh\n[ -e {waiter}.ran ] || echo no-wait\n")
    dom0.config("test.Echo", b"wait-for-session = true\nbroken\n")
    code, _, call = dom0.call("nogui:QUBESRPC test.Echo vm5")
    assert call.vm.messages() == reply(b"no-wait\n", 0)
    assert code == 0


INVALID_CONFIGS = {
    "leading-zero": b"wait-for-session = 00\n",
    "leading-zero-one": b"wait-for-session = 01\n",
    "empty-value": b"wait-for-session =\n",
    "double-quoted": b'force-user = "a"\n',
    "two": b"wait-for-session = 2\n",
    "no-equals": b"wait-for-session\n",
    "section": b"[section]\n",
    "leading-space": b" wait-for-session = true\n",
    "duplicate": b"wait-for-session = true\nwait-for-session = true\n",
    "nul": b"wait-for-session = true\n\0\n",
    "conflict": b"force-user = 'u'\nskip-service-descriptor = true\n",
}


@pytest.mark.parametrize("case", sorted(INVALID_CONFIGS))
def test_invalid_rpc_config_gets_the_125_sequence(dom0: Dom0, case: str) -> None:
    dom0.service("test.Echo", ENV_SERVICE)
    dom0.config("test.Echo", INVALID_CONFIGS[case])
    code, raw, _ = dom0.call("QUBESRPC test.Echo vm5", "-E")
    assert raw == HELLO4 + ERR_EOF + OUT_EOF + exit_code(125)
    assert code == 125


def test_rpc_config_stat_error_gets_the_125_sequence(dom0: Dom0) -> None:
    dom0.service("test.Echo", ENV_SERVICE)
    (dom0.configs / "test.Echo").symlink_to("/dev/null/x")
    code, raw, _ = dom0.call("QUBESRPC test.Echo vm5")
    assert raw == HELLO4 + ERR_EOF + OUT_EOF + exit_code(125)
    assert code == 125


def test_unknown_keys_and_force_user_are_ignored(dom0: Dom0) -> None:
    dom0.service("test.Echo", "#!/bin/sh\nid -u\n")
    dom0.config("test.Echo", b"# comment\nsome-key = true\nforce-user = 'nobody'\n")
    code, _, call = dom0.call("QUBESRPC test.Echo vm5")
    assert call.vm.messages() == reply(f"{os.getuid()}\n".encode(), 0)
    assert code == 0


# ---- the service's stdio and life ----


def test_service_starts_before_the_vchan_and_has_socketpair_stdio(dom0: Dom0) -> None:
    started = dom0.system.base / "started"
    dom0.service(
        "test.Echo",
        f"#!/bin/sh\ntouch {started}\n"
        "[ -S /dev/stdin ] && echo stdin-socket\n[ -S /dev/stdout ] && echo stdout-socket\n",
    )
    call = dom0.start("QUBESRPC test.Echo vm5", "-w", "0")
    deadline = 30.0
    while not started.exists() and deadline > 0:  # no VM listens yet
        threading.Event().wait(0.05)
        deadline -= 0.05
    assert started.exists(), "the service did not start before the vchan connection"
    call.vm.accept()
    call.vm.send(stdin(b""))
    call.vm.read_all()
    assert call.vm.messages() == reply(b"stdin-socket\nstdout-socket\n", 0)
    assert call.finish()[0] == 0


def test_input_the_service_does_not_take_yet_is_held(dom0: Dom0) -> None:
    dom0.service("test.Echo", "#!/bin/sh\nsleep 1\ncat\n")
    data = bytes(range(256)) * 4096
    call = dom0.start("QUBESRPC test.Echo vm5")
    call.vm.accept()
    chunks = [stdin(data[at : at + 65536]) for at in range(0, len(data), 65536)]
    sender = threading.Thread(target=call.vm.send, args=(b"".join(chunks) + stdin(b""),))
    sender.start()
    call.vm.read_all()
    sender.join(30)
    # Every byte arrives, then STDOUT EOF and the code: nothing buffered is lost at exit.
    assert call.vm.messages() == reply(data, 0)
    assert call.finish()[0] == 0


def test_input_after_the_service_closed_stdin_is_dropped(dom0: Dom0) -> None:
    dom0.service("test.Echo", "#!/bin/sh\nhead -c 3\nexec 0<&-\nsleep 0.5\necho done\nexit 2\n")
    call = dom0.start("QUBESRPC test.Echo vm5")
    call.vm.accept()
    call.vm.send(stdin(b"abc"))
    call.vm.read_until(b"abc")
    threading.Event().wait(0.2)
    for _ in range(20):
        call.vm.send(stdin(b"x" * 4096))
    call.vm.send(stdin(b""))
    call.vm.read_all()
    assert call.vm.messages() == reply(b"abcdone\n", 2)
    assert call.finish()[0] == 2


def test_exit_code_does_not_wait_for_stdin_eof(dom0: Dom0) -> None:
    dom0.service("test.Echo", "#!/bin/sh\necho hi\nexit 4\n")
    call = dom0.start("QUBESRPC test.Echo vm5")
    call.vm.accept()
    call.vm.read_all()  # no STDIN EOF is ever sent
    assert call.vm.messages() == reply(b"hi\n", 4)
    assert call.finish()[0] == 4


def test_signal_is_128_plus_signo(dom0: Dom0) -> None:
    dom0.service("test.Echo", "#!/bin/sh\nkill -TERM $$\n")
    code, _, call = dom0.call("QUBESRPC test.Echo vm5")
    assert call.vm.messages() == reply(b"", 143)
    assert code == 143


@pytest.mark.parametrize("no_exit_code", [False, True])
def test_vchan_closed_first_sends_no_code_and_waits_for_the_service(
    dom0: Dom0, no_exit_code: bool
) -> None:
    dom0.service("test.Echo", "#!/bin/sh\ncat >/dev/null\nsleep 0.3\nexit 6\n")
    call = dom0.start("QUBESRPC test.Echo vm5", *(("-E",) if no_exit_code else ()))
    call.vm.accept()
    call.vm.read_until(ERR_EOF)
    call.vm.close()
    code, _ = call.finish()
    assert call.vm.raw == HELLO4 + ERR_EOF
    assert code == (0 if no_exit_code else 6)


# ---- socket and /dev/tcp services ----


class RecordingService:
    """A one-connection service: records the descriptor (up to NUL) as soon as it comes,
    then the rest until EOF, and answers ``reply``."""

    def __init__(self, server: socket.socket, reply: bytes, descriptor: bool = True) -> None:
        self.server = server
        self.reply = reply
        self.descriptor_seen = threading.Event()
        self.received = b""
        self.expect_descriptor = descriptor
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        with self.server:
            conn, _ = self.server.accept()
        with conn:
            if not self.expect_descriptor:
                self.descriptor_seen.set()
            while chunk := conn.recv(65536):
                self.received += chunk
                if b"\0" in self.received:
                    self.descriptor_seen.set()
            conn.sendall(self.reply)


def test_socket_service_connected_and_descriptor_sent_before_the_vchan(dom0: Dom0) -> None:
    service = RecordingService(bind_unix(str(dom0.services / "test.Sock")), b"answer")
    call = dom0.start("QUBESRPC test.Sock+x vm5 name dom0", "-w", "0")
    assert service.descriptor_seen.wait(30), "no descriptor before the vchan existed"
    call.vm.accept()
    call.vm.send(stdin(b"q") + stdin(b""))
    call.vm.read_all()
    service.thread.join(10)
    assert service.received == b"test.Sock+x vm5 name dom0\0q"
    assert call.vm.messages() == reply(b"answer", 0)
    assert call.finish()[0] == 0


def test_socket_service_without_descriptor(dom0: Dom0) -> None:
    service = RecordingService(
        bind_unix(str(dom0.services / "test.Sock")), b"answer", descriptor=False
    )
    dom0.config("test.Sock", b"skip-service-descriptor = true\n")
    code, _, call = dom0.call("QUBESRPC test.Sock vm5", input=b"q")
    service.thread.join(10)
    assert service.received == b"q"
    assert call.vm.messages() == reply(b"answer", 0)
    assert code == 0


def test_dev_tcp_service_gets_the_descriptor(dom0: Dom0) -> None:
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    service = RecordingService(server, b"tcp answer")
    (dom0.services / "test.Tcp").symlink_to(f"/dev/tcp/127.0.0.1/{port}")
    code, _, call = dom0.call("QUBESRPC test.Tcp vm5 keyword adminvm", input=b"q")
    service.thread.join(10)
    assert service.received == b"test.Tcp vm5 keyword adminvm\0q"
    assert call.vm.messages() == reply(b"tcp answer", 0)
    assert code == 0


@pytest.mark.parametrize(
    "link,name",
    [
        ("/dev/tcp/127.0.0.1", "test.Tcp"),
        ("/dev/tcp", "test.Tcp+127.0.0.1"),
        ("/dev/tcp/127.0.0.1/1", "test.Tcp"),
    ],
    ids=["no-port", "no-plus", "refused"],
)
def test_dev_tcp_failures_get_the_125_sequence(dom0: Dom0, link: str, name: str) -> None:
    (dom0.services / "test.Tcp").symlink_to(link)
    code, raw, _ = dom0.call(f"QUBESRPC {name} vm5")
    assert raw == HELLO4 + ERR_EOF + OUT_EOF + exit_code(125)
    assert code == 125


# ---- -d VM -c: no data phase ----


def vm_connect(dom0: Dom0, *options: str) -> tuple[int, FakeSourceDaemon, FakeSourceDaemon]:
    target = FakeSourceDaemon(
        dom0.system.socket_dir, "vm2", encode(ExecParams(MsgType.EXEC_CMDLINE, 2, 515))
    )
    source = FakeSourceDaemon(dom0.system.socket_dir, SRCID, b"", close_after_reply=True)
    source.watch = target
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "qrexec.client.cli",
            "-d",
            "vm2",
            "-c",
            f"{REQ},vm5,{SRCID}",
            *options,
            "user:QUBESRPC test.Echo+ vm5",
        ],
        capture_output=True,
        env=dom0.env(),
        timeout=30,
        check=False,
    )
    return result.returncode, target, source


def test_vm_connect_sends_exec_then_service_connect(dom0: Dom0) -> None:
    code, target, source = vm_connect(dom0)
    assert code == 0
    target.join()
    source.join()
    assert target.request == frame(
        MsgType.EXEC_CMDLINE, struct.pack("<II", SRCID, 0) + b"user:QUBESRPC test.Echo+ vm5\0"
    )
    assert source.request == frame(
        MsgType.SERVICE_CONNECT, struct.pack("<II", 2, 515) + REQ.encode().ljust(32, b"\0")
    )
    # The target's socket is closed before the source's daemon is contacted.
    assert source.watched_was_closed is True
    assert target.closed_by_client.wait(10)


def test_vm_connect_with_w_keeps_the_target_socket_until_its_end(dom0: Dom0) -> None:
    target = FakeSourceDaemon(
        dom0.system.socket_dir,
        "vm2",
        encode(ExecParams(MsgType.EXEC_CMDLINE, 2, 515)),
        close_after_reply=True,
        close_delay=1.0,
    )
    source = FakeSourceDaemon(dom0.system.socket_dir, SRCID, b"", close_after_reply=True)
    source.watch = target
    argv = [sys.executable, "-m", "qrexec.client.cli", "-W", "-d", "vm2", "-c"]
    result = subprocess.run(
        [*argv, f"{REQ},vm5,{SRCID}", "user:true"],
        capture_output=True,
        env=dom0.env(),
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    source.join()
    assert source.request[:16] == struct.pack("<IIII", MsgType.SERVICE_CONNECT, 40, 2, 515)
    # Kept open while the source was told, then waited for until the daemon ended it.
    assert source.watched_was_closed is False


def test_vm_connect_without_source_daemon_exits_137(dom0: Dom0) -> None:
    FakeSourceDaemon(
        dom0.system.socket_dir, "vm2", encode(ExecParams(MsgType.EXEC_CMDLINE, 2, 515))
    )
    argv = [sys.executable, "-m", "qrexec.client.cli", "-E", "-d", "vm2", "-c"]
    result = subprocess.run(
        [*argv, f"{REQ},vm5,{SRCID}", "user:true"],
        capture_output=True,
        env=dom0.env(),
        timeout=30,
        check=False,
    )
    assert result.returncode == 137


def test_vm_connect_failure_exits_137(dom0: Dom0) -> None:
    """No daemon for vm2 (not running; no autostart here)."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "qrexec.client.cli",
            "-d",
            "vm2",
            "-c",
            f"{REQ},vm5,{SRCID}",
            "user:QUBESRPC test.Echo+ vm5",
        ],
        capture_output=True,
        env=dom0.env(),
        timeout=30,
        check=False,
    )
    assert result.returncode == 137


@pytest.mark.parametrize("options", [(), ("-E",)])
def test_no_source_daemon_exits_125_even_with_e(dom0: Dom0, options: tuple[str, ...]) -> None:
    result = subprocess.run(
        dom0.argv("QUBESRPC test.Echo vm5", *options),
        capture_output=True,
        env=dom0.env(),
        timeout=30,
        check=False,
    )
    assert result.returncode == 125
