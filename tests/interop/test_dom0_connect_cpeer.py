"""Differential: ``qrexec-client -d dom0 -c`` - ours and R4.3's - fed the same bytes (§15.1).

Each scenario runs once with our client and once with Qubes' C client (built by
``qrexec.sim.cpeer``), against the same fake source daemon and fake qrexec-client-vm, and
must give the same bytes to the daemon socket, the same reply stream to the VM (data
chunks merged) and the same exit code.

Deliberate differences, not compared here (each is pinned for ours in
``tests/integration/test_dom0_connect.py`` and listed in ``docs/decisions.md``):

* a malformed ``QUBESRPC`` line: R4.3 dies of SIGSEGV, ours sends the 125 sequence;
* a daemon answer of another type: R4.3 aborts, ours exits 125;
* ``-w N`` with no VM listening: R4.3's vchan-socket client blocks forever, ours gives up;
* with the vchan-socket transport, R4.3 connects the vchan before starting the service
  (its client init blocks until the server exists); ours starts it first, as the spec says;
* usage errors exit 1 in both; only the message text differs.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from qrexec.daemon.clients import bind_unix
from qrexec.protocol.messages import Message
from tests.integration.conftest import QrexecSystem
from tests.integration.test_dom0_connect import (
    ENV_SERVICE,
    INVALID_CONFIGS,
    WAIT_SERVICE,
    Dom0,
    RecordingService,
)

pytestmark = [pytest.mark.cpeer, pytest.mark.timeout(120)]

Outcome = tuple[int, bytes, list[Message], bytes]


def _whole(dom0: Dom0, command: str, *options: str, data: bytes = b"in\n") -> Outcome:
    code, _, call = dom0.call(command, *options, input=data)
    return code, call.daemon.request, call.vm.messages(), b""


def executable(dom0: Dom0) -> Outcome:
    dom0.service("test.Echo", ENV_SERVICE)
    return _whole(dom0, "QUBESRPC test.Echo+a vm5 name dom0")


def keyword_and_other_type(dom0: Dom0) -> Outcome:
    dom0.service("test.Echo", ENV_SERVICE)
    first = _whole(dom0, "QUBESRPC test.Echo vm5 keyword adminvm")
    second = _whole(dom0, "QUBESRPC test.Echo vm5 other x")
    return first[0] * 256 + second[0], first[1], first[2] + second[2], b""


def wrong_word_count(dom0: Dom0) -> Outcome:
    dom0.service("test.Echo", ENV_SERVICE)
    return _whole(dom0, "QUBESRPC test.Echo vm5 name")


def wrong_word_count_no_exit_code(dom0: Dom0) -> Outcome:
    dom0.service("test.Echo", ENV_SERVICE)
    return _whole(dom0, "QUBESRPC test.Echo a b c d", "-E")


def not_found_no_exit_code(dom0: Dom0) -> Outcome:
    return _whole(dom0, "QUBESRPC no.Such+x vm5", "-E")


def shell_command(dom0: Dom0) -> Outcome:
    return _whole(dom0, 'echo "$QREXEC_REMOTE_DOMAIN|${BASH_VERSION:+bash}"; cat; exit 7')


def user_prefixed(dom0: Dom0) -> Outcome:
    return _whole(dom0, "DEFAULT:QUBESRPC test.Echo vm5")


def prefix_data(dom0: Dom0) -> Outcome:
    dom0.service("test.Echo", "#!/bin/sh\necho svc\n")
    return _whole(dom0, "QUBESRPC test.Echo vm5", "-p", "PRE")


def wait_for_session(dom0: Dom0) -> Outcome:
    waiter = dom0.service("qubes.WaitForSession", WAIT_SERVICE)
    dom0.service("test.Echo", f"#!/bin/sh\ncat {waiter}.ran\n")
    dom0.config("test.Echo", b"wait-for-session = true\n")
    return _whole(dom0, "QUBESRPC test.Echo+x vm7 name dom0")


def invalid_configs(dom0: Dom0) -> Outcome:
    dom0.service("test.Echo", ENV_SERVICE)
    codes, messages = 0, []
    for case in sorted(INVALID_CONFIGS):
        dom0.config("test.Echo", INVALID_CONFIGS[case])
        code, _, got, _ = _whole(dom0, "QUBESRPC test.Echo vm5", "-E")
        codes += code
        messages += got
    return codes, b"", messages, b""


def socket_service(dom0: Dom0) -> Outcome:
    service = RecordingService(bind_unix(str(dom0.services / "test.Sock")), b"answer")
    code, request, messages, _ = _whole(dom0, "QUBESRPC test.Sock+x vm5 name dom0", data=b"q")
    service.thread.join(10)
    return code, request, messages, service.received


def tcp_service(dom0: Dom0) -> Outcome:
    server = socket.create_server(("127.0.0.1", 0))
    service = RecordingService(server, b"tcp answer")
    (dom0.services / "test.Tcp").symlink_to(f"/dev/tcp/127.0.0.1/{server.getsockname()[1]}")
    code, request, messages, _ = _whole(dom0, "QUBESRPC test.Tcp vm5", data=b"q")
    service.thread.join(10)
    return code, request, messages, service.received


def tcp_failures(dom0: Dom0) -> Outcome:
    codes, messages = 0, []
    for link, name in (("/dev/tcp/127.0.0.1", "test.Tcp"), ("/dev/tcp", "test.Tcp+127.0.0.1")):
        path = dom0.services / "test.Tcp"
        path.unlink(missing_ok=True)
        path.symlink_to(link)
        code, _, got, _ = _whole(dom0, f"QUBESRPC {name} vm5")
        codes += code
        messages += got
    return codes, b"", messages, b""


def signal_exit(dom0: Dom0) -> Outcome:
    dom0.service("test.Echo", "#!/bin/sh\nkill -TERM $$\n")
    return _whole(dom0, "QUBESRPC test.Echo vm5")


def no_stdin_eof_needed(dom0: Dom0) -> Outcome:
    dom0.service("test.Echo", "#!/bin/sh\necho hi\nexit 4\n")
    call = dom0.start("QUBESRPC test.Echo vm5")
    call.vm.accept()
    call.vm.read_all()
    code, _ = call.finish()
    return code, call.daemon.request, call.vm.messages(), b""


def vchan_closed_first(dom0: Dom0) -> Outcome:
    dom0.service("test.Echo", "#!/bin/sh\ncat >/dev/null\nsleep 0.3\nexit 6\n")
    call = dom0.start("QUBESRPC test.Echo vm5")
    call.vm.accept()
    call.vm.read_until(b"\x92\x01\x00\x00\x00\x00\x00\x00")
    call.vm.close()
    code, _ = call.finish()
    return code, call.daemon.request, [], call.vm.raw


SCENARIOS: dict[str, Callable[[Dom0], Outcome]] = {
    func.__name__: func
    for func in (
        executable,
        keyword_and_other_type,
        wrong_word_count,
        wrong_word_count_no_exit_code,
        not_found_no_exit_code,
        shell_command,
        user_prefixed,
        prefix_data,
        wait_for_session,
        invalid_configs,
        socket_service,
        tcp_service,
        tcp_failures,
        signal_exit,
        no_stdin_eof_needed,
        vchan_closed_first,
    )
}


@pytest.fixture
def systems(tmp_path: Path) -> Iterator[tuple[QrexecSystem, QrexecSystem]]:
    ours = QrexecSystem(tmp_path / "ours")
    theirs = QrexecSystem(tmp_path / "theirs")
    try:
        yield ours, theirs
    finally:
        ours.stop_all()
        theirs.stop_all()


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_same_bytes_and_exit_code_as_r43(
    systems: tuple[QrexecSystem, QrexecSystem], c_peer_bin: Path, scenario: str
) -> None:
    ours_system, theirs_system = systems
    ours = Dom0(ours_system)
    theirs = Dom0(
        theirs_system,
        [str(c_peer_bin / "qrexec-client"), f"--socket-dir={theirs_system.socket_dir}"],
    )
    try:
        expected = SCENARIOS[scenario](theirs)
        got = SCENARIOS[scenario](ours)
    finally:
        ours.stop()
        theirs.stop()
    assert got == expected
