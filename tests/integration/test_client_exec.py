"""dom0 -> VM calls through our daemon and agent over the socket backend (spec §4(i))."""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

import pytest

from qrexec.daemon.clients import bind_unix
from tests.integration.conftest import Domain, QrexecSystem, serve_once

pytestmark = pytest.mark.timeout(120)

ENV_DUMP = """#!/bin/sh
echo "argv=$*"
for var in QREXEC_REMOTE_DOMAIN QREXEC_SERVICE_FULL_NAME QREXEC_SERVICE_ARGUMENT \\
    QREXEC_REQUESTED_TARGET_TYPE HOME; do
    eval "echo $var=\\${$var-unset}"
done
echo "agent_pid_set=${QREXEC_AGENT_PID:+yes}"
echo "domain_root_leak=${QREXEC_DOMAIN_ROOT-unset}"
"""


@pytest.fixture(params=["v4", "v2"])
def vm1(request: pytest.FixtureRequest, qrexec_system: QrexecSystem) -> Domain:
    """vm1 with every program at our full version, and again with all capped at v2."""
    if request.param == "v2":
        qrexec_system.common_env["QREXEC_PROTOCOL_VERSION"] = "2"
    return qrexec_system.start_vm("vm1", 1)


def lines(data: bytes) -> list[str]:
    return data.decode().splitlines()


def test_shell_command_with_stdin_stdout_stderr_and_exit_code(
    qrexec_system: QrexecSystem, vm1: Domain
) -> None:
    result = qrexec_system.client(
        "vm1",
        f"{qrexec_system.user}:echo hi; cat; echo err >&2; exit 7",
        input=b"line one\nline two\n",
    )
    assert result.stdout == b"hi\nline one\nline two\n"
    assert result.stderr == b"err\n"
    assert result.returncode == 7


def test_destination_by_uuid_link(qrexec_system: QrexecSystem) -> None:
    qrexec_system.start_agent("vm1", 1)
    uuid = "7d2b9a3c-1111-4c2e-9a55-0123456789ab"
    qrexec_system.start_daemon("vm1", 1, args=["-u", uuid])
    qrexec_system.wait_connected(qrexec_system.domains["vm1"])
    assert os.readlink(qrexec_system.socket_dir / f"qrexec.uuid:{uuid}") == "qrexec.1"
    result = qrexec_system.client(f"uuid:{uuid}", f"{qrexec_system.user}:echo by-uuid")
    assert (result.returncode, result.stdout) == (0, b"by-uuid\n")


def test_service_with_argument_and_environment(qrexec_system: QrexecSystem, vm1: Domain) -> None:
    vm1.write_service("test.Env", ENV_DUMP)
    result = qrexec_system.client("vm1", f"{qrexec_system.user}:QUBESRPC test.Env+the-arg srcvm")
    assert result.returncode == 0, result.stderr
    out = lines(result.stdout)
    assert "argv=the-arg" in out
    assert "QREXEC_REMOTE_DOMAIN=srcvm" in out
    assert "QREXEC_SERVICE_FULL_NAME=test.Env+the-arg" in out
    assert "QREXEC_SERVICE_ARGUMENT=the-arg" in out
    assert "QREXEC_REQUESTED_TARGET_TYPE=" in out
    assert f"HOME={vm1.root}/home/{qrexec_system.user}" in out
    assert "agent_pid_set=yes" in out
    assert "domain_root_leak=unset" in out


def test_service_without_argument_has_no_argument_variable(
    qrexec_system: QrexecSystem, vm1: Domain
) -> None:
    vm1.write_service("test.Env", ENV_DUMP)
    result = qrexec_system.client("vm1", f"{qrexec_system.user}:QUBESRPC test.Env srcvm")
    out = lines(result.stdout)
    assert "argv=" in out
    assert "QREXEC_SERVICE_ARGUMENT=unset" in out
    assert "QREXEC_SERVICE_FULL_NAME=test.Env" in out


def test_service_plus_argument_file_wins_over_plain_service(
    qrexec_system: QrexecSystem, vm1: Domain
) -> None:
    vm1.write_service("test.Pick", "#!/bin/sh\necho generic\n", directory="usr/local/etc/qubes-rpc")
    vm1.write_service("test.Pick+special", "#!/bin/sh\necho specific\n")
    user = qrexec_system.user
    assert qrexec_system.client("vm1", f"{user}:QUBESRPC test.Pick+special src").stdout == (
        b"specific\n"
    )
    assert qrexec_system.client("vm1", f"{user}:QUBESRPC test.Pick+other src").stdout == (
        b"generic\n"
    )


def test_seed_one_line_service_file_inside_the_domain_root(
    qrexec_system: QrexecSystem, vm1: Domain
) -> None:
    # The seed's HOWTO, verbatim, with "/" being vm1's root folder.
    vm1.write_file(
        "usr/bin/our_test_add_server",
        "#!/bin/sh\nread arg1 arg2\necho $(($arg1+$arg2))\n",
        0o755,
    )
    vm1.write_file("etc/qubes_rpc/test.Add", "/usr/bin/our_test_add_server\n")
    result = qrexec_system.client(
        "vm1", f"{qrexec_system.user}:QUBESRPC test.Add vm2", input=b"11 22\n"
    )
    assert (result.returncode, result.stdout) == (0, b"33\n")


def test_one_line_files_count_only_in_the_2011_directory(
    qrexec_system: QrexecSystem, vm1: Domain
) -> None:
    vm1.write_file("usr/bin/prog", "#!/bin/sh\necho ran\n", 0o755)
    vm1.write_file("etc/qubes-rpc/test.Line", "/usr/bin/prog\n", 0o755)
    result = qrexec_system.client("vm1", f"{qrexec_system.user}:QUBESRPC test.Line src")
    # Executed as a shell script, "/usr/bin/prog" is the host's path, which does not exist.
    assert result.stdout != b"ran\n"
    assert result.returncode != 0


def test_socket_service_gets_descriptor_and_stdin(qrexec_system: QrexecSystem, vm1: Domain) -> None:
    service_dir = vm1.root / "etc/qubes-rpc"
    service_dir.mkdir(parents=True)
    thread, received = serve_once(bind_unix(str(service_dir / "test.Sock")), b"socket says hi\n")
    result = qrexec_system.client(
        "vm1", f"{qrexec_system.user}:QUBESRPC test.Sock+x srcvm", input=b"payload"
    )
    thread.join(10)
    assert received == [b"test.Sock+x srcvm\0payload"]
    assert (result.returncode, result.stdout, result.stderr) == (0, b"socket says hi\n", b"")


def test_socket_service_without_descriptor(qrexec_system: QrexecSystem, vm1: Domain) -> None:
    service_dir = vm1.root / "etc/qubes-rpc"
    service_dir.mkdir(parents=True)
    vm1.write_file("etc/qubes/rpc-config/test.Sock", "skip-service-descriptor = true\n")
    thread, received = serve_once(bind_unix(str(service_dir / "test.Sock")), b"ok")
    result = qrexec_system.client(
        "vm1", f"{qrexec_system.user}:QUBESRPC test.Sock srcvm", input=b"raw"
    )
    thread.join(10)
    assert received == [b"raw"]
    assert result.stdout == b"ok"


def test_tcp_symlink_service(qrexec_system: QrexecSystem, vm1: Domain) -> None:
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    thread, received = serve_once(server, b"tcp reply")
    service_dir = vm1.root / "etc/qubes-rpc"
    service_dir.mkdir(parents=True)
    (service_dir / "test.Tcp").symlink_to("/dev/tcp/127.0.0.1")
    result = qrexec_system.client(
        "vm1", f"{qrexec_system.user}:QUBESRPC test.Tcp+{port} srcvm", input=b"in"
    )
    thread.join(10)
    assert received == [f"test.Tcp+{port} srcvm\0in".encode()]
    assert (result.returncode, result.stdout) == (0, b"tcp reply")


def test_missing_service_exits_127(qrexec_system: QrexecSystem, vm1: Domain) -> None:
    result = qrexec_system.client("vm1", f"{qrexec_system.user}:QUBESRPC no.Such+arg srcvm")
    assert (result.returncode, result.stdout) == (127, b"")


def test_unexecutable_service_exits_125(qrexec_system: QrexecSystem, vm1: Domain) -> None:
    path = vm1.write_service("test.NoExec", "#!/bin/sh\necho never\n")
    path.chmod(0o644)
    result = qrexec_system.client("vm1", f"{qrexec_system.user}:QUBESRPC test.NoExec srcvm")
    assert (result.returncode, result.stdout) == (125, b"")


def test_broken_rpc_config_fails_the_call(qrexec_system: QrexecSystem, vm1: Domain) -> None:
    vm1.write_service("test.Cfg", "#!/bin/sh\necho never\n")
    vm1.write_file("etc/qubes/rpc-config/test.Cfg", "wait-for-session = 'maybe'\n")
    result = qrexec_system.client("vm1", f"{qrexec_system.user}:QUBESRPC test.Cfg srcvm")
    assert (result.returncode, result.stdout) == (125, b"")


def test_just_exec_runs_the_command_and_returns_its_start_status(
    qrexec_system: QrexecSystem, vm1: Domain
) -> None:
    marker = vm1.root / "marker"
    result = qrexec_system.client(
        "vm1", f"{qrexec_system.user}:echo visible; touch {marker}", "-e", "-W"
    )
    assert (result.returncode, result.stdout) == (0, b"")
    vm1.write_service("test.Touch", f"#!/bin/sh\ntouch {marker}.svc\n")
    assert (
        qrexec_system.client(
            "vm1", f"{qrexec_system.user}:QUBESRPC test.Touch src", "-e"
        ).returncode
        == 0
    )
    missing = qrexec_system.client("vm1", f"{qrexec_system.user}:QUBESRPC no.Such src", "-e")
    assert missing.returncode == 127
    for path in (marker, Path(f"{marker}.svc")):
        for _ in range(200):
            if path.exists():
                break
            threading.Event().wait(0.05)
        assert path.exists()


def test_no_exit_code_option(qrexec_system: QrexecSystem, vm1: Domain) -> None:
    result = qrexec_system.client("vm1", f"{qrexec_system.user}:exit 3", "-E")
    assert result.returncode == 0


def test_prefix_data_goes_before_stdin(qrexec_system: QrexecSystem, vm1: Domain) -> None:
    result = qrexec_system.client(
        "vm1", f"{qrexec_system.user}:cat", "-p", "prefix-", input=b"stdin"
    )
    assert result.stdout == b"prefix-stdin"


def test_output_filtering(qrexec_system: QrexecSystem, vm1: Domain) -> None:
    command = f"{qrexec_system.user}:printf 'a\\033b\\tc\\n'; printf 'x\\001y\\n' >&2"
    filtered = qrexec_system.client("vm1", command, "-t", "-T")
    assert (filtered.stdout, filtered.stderr) == (b"a_b\tc\n", b"x_y\n")
    raw = qrexec_system.client("vm1", command)
    assert (raw.stdout, raw.stderr) == (b"a\033b\tc\n", b"x\001y\n")


def test_local_command_is_connected_both_ways(qrexec_system: QrexecSystem, vm1: Domain) -> None:
    out = qrexec_system.base / "local-out"
    result = qrexec_system.client(
        "vm1",
        f"{qrexec_system.user}:read line; echo got:$line",
        "-l",
        f"echo from-local; cat > {out}",
    )
    assert result.returncode == 0
    assert out.read_bytes() == b"got:from-local\n"


def test_use_stdin_socket(qrexec_system: QrexecSystem, vm1: Domain) -> None:
    ours, theirs = socket.socketpair()
    proc = __import__("subprocess").Popen(
        qrexec_system.client_argv("vm1", f"{qrexec_system.user}:cat", "--use-stdin-socket"),
        stdin=theirs,
        env=qrexec_system.env(0),
    )
    theirs.close()
    ours.sendall(b"both ways")
    ours.shutdown(socket.SHUT_WR)
    data = b""
    while chunk := ours.recv(4096):
        data += chunk
    assert proc.wait(60) == 0
    assert data == b"both ways"


def test_signal_exit_is_128_plus_signo(qrexec_system: QrexecSystem, vm1: Domain) -> None:
    result = qrexec_system.client("vm1", f"{qrexec_system.user}:kill -TERM $$")
    assert result.returncode == 128 + 15


def test_single_socket_mode_after_sigusr1(qrexec_system: QrexecSystem, vm1: Domain) -> None:
    vm1.write_service(
        "test.Single",
        '#!/bin/sh\nkill -USR1 "$QREXEC_AGENT_PID"\nexec 1>&-\necho via-stdin-socket >&0\n',
    )
    result = qrexec_system.client("vm1", f"{qrexec_system.user}:QUBESRPC test.Single src")
    assert (result.returncode, result.stdout) == (0, b"via-stdin-socket\n")
    assert vm1.agent is not None
    again = qrexec_system.client("vm1", f"{qrexec_system.user}:echo agent alive")
    assert again.stdout == b"agent alive\n"


def test_unknown_destination_is_a_qrexec_problem(qrexec_system: QrexecSystem) -> None:
    result = qrexec_system.client("nosuchvm", "user:true")
    assert result.returncode == 125
