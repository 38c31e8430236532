"""The VM side's byte-level scenarios (spec §15.4-§15.7) run against Qubes' C programs too.

The same fake peers and the same assertions drive Qubes' ``qrexec-agent`` (as
:mod:`tests.integration.test_agent_traps` drives ours) and Qubes' ``qrexec-client-vm``
(as :mod:`tests.integration.test_client_vm_local` drives ours), so a scenario that passes
for both shows the bytes are the same. Deliberate differences are not run against the C
programs; they are listed here and in ``docs/decisions.md``:

* a second SERVICE_CONNECT for an ident already answered: upstream writes 8 more bytes to
  that descriptor, ours ignores it (``test_service_connect_writes_8_bytes_then_terminates``);
* towards a v3 daemon our agent sends TRIGGER_SERVICE3, upstream TRIGGER_SERVICE4
  (``test_v3_daemon_gets_trigger3_with_the_same_bytes``);
* ``qrexec-client-vm`` gives a program still reading stdin after the call EOF, where upstream
  leaves it waiting (``test_stdin_eof_at_once_when_exit_code_comes_first``), and words its
  exec-failure message differently (the 255 is compared here);
* executable services are not compared: a root C agent needs a PAM ``qrexec`` service this
  machine may not have (it answers 125 then).
"""

from __future__ import annotations

import shutil
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from qrexec.protocol.constants import MsgType
from tests.integration import test_agent_traps as agent
from tests.integration import test_client_vm_local as client
from tests.integration.fake_peers import exit_frame, frame, params

pytestmark = [pytest.mark.cpeer, pytest.mark.timeout(180)]

IMPLEMENTATIONS = ["ours", "qubes"]


@pytest.fixture(params=IMPLEMENTATIONS)
def world(request: pytest.FixtureRequest) -> Iterator[agent.AgentWorld]:
    c_agent = None
    if request.param == "qubes":
        c_agent = request.getfixturevalue("c_peer_bin") / "qrexec-agent"
    with agent.agent_world(c_agent) as made:
        yield made


@pytest.fixture(params=IMPLEMENTATIONS)
def base(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    if request.param == "qubes":
        bin_dir = request.getfixturevalue("c_peer_bin")
        monkeypatch.setattr(client.Call, "c_client", bin_dir / "qrexec-client-vm")
    path = Path(tempfile.mkdtemp(prefix="qv", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# ---- agent: §15.5-§15.7 ----


def test_start_failure(world: agent.AgentWorld) -> None:
    agent.test_vm_start_failure_sends_stdout_eof_first(world)


def test_not_executable(world: agent.AgentWorld) -> None:
    agent.test_not_executable_is_a_start_failure(world)


@pytest.mark.parametrize(
    ("link", "arg"),
    [
        ("/dev/tcp/", ""),
        ("/dev/tcp", ""),
        ("/dev/tcp", "127.0.0.1"),
        ("/dev/tcp", "127_0_0_1+22"),
        ("/dev/tcp/127.0.0.1", ""),
        ("/dev/tcp/::1", ""),
        ("/dev/tcp/127.0.0.1/22", "x"),
        ("/dev/tcp/127.0.0.1", "022"),
        ("/dev/tcp/127.0.0.1", "65536"),
        ("/dev/tcp/localhost", "22"),
        ("REFUSED", ""),
    ],
)
def test_dev_tcp_errors(world: agent.AgentWorld, link: str, arg: str) -> None:
    agent.test_dev_tcp_errors_are_125_stdout_eof_first(world, link, arg)


def test_tcp_started(world: agent.AgentWorld) -> None:
    agent.test_tcp_service_once_started_sends_stderr_eof_first(world)


def test_just_exec_socket(world: agent.AgentWorld) -> None:
    agent.test_just_exec_socket_service(world)


def test_just_exec_socket_no_descriptor(world: agent.AgentWorld) -> None:
    agent.test_just_exec_socket_service_without_descriptor(world)


def test_just_exec_socket_failures(world: agent.AgentWorld) -> None:
    agent.test_just_exec_socket_failures(world)


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
def test_agent_exits(world: agent.AgentWorld, bad: bytes) -> None:
    agent.test_agent_exits_on_daemon_violations(world, bad)


def test_bad_idents_ignored(world: agent.AgentWorld) -> None:
    agent.test_service_connect_bad_idents_are_ignored(world)


@pytest.mark.parametrize(
    "bad",
    [
        frame(
            MsgType.TRIGGER_SERVICE3,
            b"vm2".ljust(64, b"\0") + b"SOCKET".ljust(32, b"\0") + b"s\0",
        ),
        frame(
            MsgType.TRIGGER_SERVICE, b"s".ljust(64, b"\0") + b"vm2".ljust(32, b"\0") + b"\0" * 32
        ),
        frame(MsgType.TRIGGER_SERVICE4, b"\0" * 160),
        frame(MsgType.HELLO, struct.pack("<I", 4)),
    ],
    ids=["trigger3", "trigger2", "len160", "hello"],
)
def test_trigger_only_4(world: agent.AgentWorld, bad: bytes) -> None:
    agent.test_trigger_socket_takes_only_trigger4(world, bad)


@pytest.mark.parametrize("name", [b"\0", b"a\0a\0", b"no-terminator"])
def test_trigger_checks_nothing_else(world: agent.AgentWorld, name: bytes) -> None:
    agent.test_trigger_socket_checks_nothing_else(world, name)


def test_socket_both_directions(world: agent.AgentWorld) -> None:
    agent.test_socket_service_exit_waits_for_both_directions(world)


def test_socket_exit_on_client_eof(world: agent.AgentWorld) -> None:
    agent.test_exit_on_client_eof(world)


def test_socket_exit_on_service_eof(world: agent.AgentWorld) -> None:
    agent.test_exit_on_service_eof(world)


# ---- qrexec-client-vm: §15.4 ----


def test_refused_runs_nothing(base: Path) -> None:
    client.test_refused_call_never_starts_the_program(base)


def test_starts_on_the_answer(base: Path) -> None:
    client.test_program_starts_on_the_answer_without_waiting_for_the_data_vchan(base)


def test_stdio_env_argv0(base: Path) -> None:
    client.test_stdio_env_and_argv0(base)


@pytest.mark.parametrize("value", ["", "1"])
def test_pass_local_stderr(base: Path, value: str) -> None:
    client.test_pass_local_stderr_even_empty(base, value)


@pytest.mark.parametrize("program", ["sh", "./missing", "/nonexistent/prog"])
def test_exec_failure_255(base: Path, program: str) -> None:
    call = client.Call(base, "vm2", "test.Svc", program)
    data = call.allow()
    assert client.read_stdin(data) == b""
    data.send(exit_frame(0))
    assert call.finish()[0] == 255


def test_flow(base: Path) -> None:
    client.test_flow_between_program_and_service(base)


def test_remote_code_wins(base: Path) -> None:
    client.test_remote_code_wins_when_not_zero(base)


def test_closed_early_255(base: Path) -> None:
    client.test_vchan_closed_without_exit_code_is_255(base)


def test_sigusr1(base: Path) -> None:
    client.test_sigusr1_single_socket_mode(base)


def test_sigusr1_one_shot(base: Path) -> None:
    client.test_sigusr1_is_one_shot_and_survivable(base)


def test_trigger_bytes(base: Path) -> None:
    client.test_trigger_bytes(base)
