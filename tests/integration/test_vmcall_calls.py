"""VM-initiated calls end to end over the socket backend (spec §4(ii)-(v), §6.1, §8).

Real agents, daemons, ``qrexec-policy-daemon`` and ``qrexec-client-vm`` processes; policy
in modern files in the test's dom0 root; decisions checked in the audit log. Calls that a
service author could make run on the pytest plugin's ``qrexec_testbed``; the others need
what only :mod:`tests.integration.vmcall_support` offers (capped protocol versions, daemon
options and users, a slow policy program, raw sockets, client options and terminals).
"""

from __future__ import annotations

import contextlib
import getpass
import os
import pty
import socket
import struct
import subprocess
import termios
from pathlib import Path

import pytest

from qrexec.sim import processes
from qrexec.sim.harness import RunningTestbed
from tests.integration.vmcall_support import SERVICE_ECHO_ENV, VmCallSystem, vm_uuid, vmcalls

pytestmark = pytest.mark.timeout(180)
__all__ = ["vmcalls"]

MARKER_SERVICE = """#!/bin/sh
touch "$0.ran"
echo ran
"""


def two_vms(vmcalls: VmCallSystem, policy: str) -> None:
    vmcalls.write_policy(policy)
    vmcalls.start_policy_daemon()
    vmcalls.start_vm("vm1", 1)
    vmcalls.start_vm("vm2", 2)


def test_vm_to_vm_with_argument(qrexec_testbed: RunningTestbed) -> None:
    qrexec_testbed.set_policy("test.Env * vm1 vm2 allow\n")
    qrexec_testbed.install_service("vm2", "test.Env", SERVICE_ECHO_ENV)
    result = qrexec_testbed.call("vm1", "vm2", "test.Env+hello", b"some input\n")
    assert result.returncode == 3, result.stderr
    lines = result.stdout.decode().splitlines()
    assert lines[:5] == [
        "arg=hello",
        "remote=vm1",
        "full=test.Env+hello",
        f"user={getpass.getuser()}",
        "type=",
    ]
    assert lines[-1] == "some input"
    assert result.stderr == b"to-stderr\n"
    (decision,) = qrexec_testbed.audit()
    assert (decision["result"], decision["argument"], decision["target"]) == (
        "allow",
        "+hello",
        "vm2",
    )


def test_vm_to_vm_without_argument_and_prefix_data(vmcalls: VmCallSystem) -> None:
    two_vms(vmcalls, "test.Env * vm1 @default allow target=vm2\n")
    vmcalls.vms["vm2"].write_service("test.Env", SERVICE_ECHO_ENV)
    # '$default' is '@default' for old shells; the policy redirects it to vm2.
    result = vmcalls.call("vm1", "--prefix-data=first ", "$default", "test.Env", input=b"then")
    assert result.returncode == 3, result.stderr
    lines = result.stdout.decode().splitlines()
    assert lines[0] == "arg="
    assert lines[2] == "full=test.Env+"
    assert lines[-1] == "first then"


@pytest.mark.parametrize(
    ("requested", "target_type", "target", "keyword"),
    [("@adminvm", "keyword", "unset", "adminvm"), ("dom0", "name", "dom0", "unset")],
)
def test_vm_to_dom0(
    qrexec_testbed: RunningTestbed, requested: str, target_type: str, target: str, keyword: str
) -> None:
    qrexec_testbed.install_service("dom0", "test.Env", SERVICE_ECHO_ENV)
    qrexec_testbed.set_policy("test.Env * vm1 @adminvm allow\n")
    result = qrexec_testbed.call("vm1", requested, "test.Env+x", b"to dom0\n")
    assert result.returncode == 3, result.stderr
    lines = result.stdout.decode().splitlines()
    assert lines[:4] == ["arg=x", "remote=vm1", "full=test.Env+x", f"user={getpass.getuser()}"]
    assert lines[4:7] == [f"type={target_type}", f"target={target}", f"keyword={keyword}"]
    assert lines[-1] == "to dom0"
    # dom0 services' stderr is not forwarded: it lands in the daemon's log.
    assert b"to-stderr" not in result.stderr
    assert "to-stderr" in Path(qrexec_testbed.process("daemon", "vm1").log).read_text()
    (decision,) = qrexec_testbed.audit()
    assert decision["target"] == "dom0"


def test_vm_to_dom0_missing_service(qrexec_testbed: RunningTestbed) -> None:
    qrexec_testbed.set_policy("* * vm1 @adminvm allow\n")
    result = qrexec_testbed.call("vm1", "@adminvm", "test.Missing")
    assert result.returncode == 127


def test_denied_call_runs_nothing(qrexec_testbed: RunningTestbed) -> None:
    qrexec_testbed.set_policy("test.Marker * vm1 vm2 deny\n")
    service = qrexec_testbed.install_service("vm2", "test.Marker", MARKER_SERVICE)
    result = qrexec_testbed.call("vm1", "vm2", "test.Marker")
    assert result.returncode == 126
    assert result.stderr.decode().strip().endswith("Request refused")
    assert not Path(f"{service}.ran").exists()
    # No rule at all is a deny too.
    result = qrexec_testbed.call("vm1", "vm2", "test.Other")
    assert result.returncode == 126
    assert [d["result"] for d in qrexec_testbed.audit()] == ["deny", "deny"]
    # The same daemon still serves an allowed call (a file that sorts first wins).
    qrexec_testbed.set_policy("test.Marker * vm1 vm2 allow\n", file="10-allow.policy")
    result = qrexec_testbed.call("vm1", "vm2", "test.Marker")
    assert (result.returncode, result.stdout) == (0, b"ran\n")


def test_target_redirect(qrexec_testbed: RunningTestbed) -> None:
    qrexec_testbed.set_policy("test.Marker * vm1 vm2 allow target=vm3\n")
    in_vm2 = qrexec_testbed.install_service("vm2", "test.Marker", MARKER_SERVICE)
    in_vm3 = qrexec_testbed.install_service("vm3", "test.Marker", MARKER_SERVICE)
    result = qrexec_testbed.call("vm1", "vm2", "test.Marker")
    assert (result.returncode, result.stdout) == (0, b"ran\n"), result.stderr
    assert Path(f"{in_vm3}.ran").exists()
    assert not Path(f"{in_vm2}.ran").exists()
    (decision,) = qrexec_testbed.audit()
    assert (decision["requested_target"], decision["target"]) == ("vm2", "vm3")


def test_user_redirect(vmcalls: VmCallSystem) -> None:
    """``user=`` from the policy reaches the target agent.

    vm2's daemon has a default user that does not exist, so a call without ``user=``
    cannot run there (the agent refuses it: 125); ``user=<our user>`` runs as us. In test
    mode (non-root agent) any other user is refused the same way, as upstream's.
    """
    me = getpass.getuser()
    vmcalls.write_policy(f"test.Env +as-me vm1 vm2 allow user={me}\ntest.Env * vm1 vm2 allow\n")
    vmcalls.start_policy_daemon()
    vmcalls.start_vm("vm1", 1)
    system = vmcalls.system
    vmcalls.vms["vm2"] = system.domain("vm2", 2)
    vmcalls.write_system_info({"vm1": 1, "vm2": 2})
    system.start_agent("vm2", 2, {"QREXEC_AGENT_SOCKET": str(vmcalls.agent_socket("vm2"))})
    system.start_daemon(
        "vm2", 2, vmcalls.dom0_env(), args=["-u", vm_uuid(2)], default_user="no-such-user-qrx"
    )
    system.wait_connected(system.domains["vm2"])
    vmcalls.vms["vm2"].write_service("test.Env", SERVICE_ECHO_ENV)
    allowed = vmcalls.call("vm1", "vm2", "test.Env+as-me")
    assert allowed.returncode == 3, allowed.stderr
    assert f"user={me}" in allowed.stdout.decode().splitlines()
    default = vmcalls.call("vm1", "vm2", "test.Env+other")
    assert default.returncode == 125
    assert default.stdout == b""
    users = [d["user"] for d in vmcalls.audit()]
    assert users[0] == me


@pytest.mark.parametrize("cap", ["3", "2"])
def test_capped_daemon_with_v4_client(vmcalls: VmCallSystem, cap: str) -> None:
    """A v4 qrexec-client-vm behind a daemon capped at v3 or v2: the agent down-converts."""
    capped = {"QREXEC_PROTOCOL_VERSION": cap}
    vmcalls.write_policy("* * vm1 vm2 allow\n")
    vmcalls.start_policy_daemon()
    vmcalls.start_vm("vm1", 1, daemon_env=capped)
    vmcalls.start_vm("vm2", 2, daemon_env=capped)
    vmcalls.vms["vm2"].write_service("test.Env", SERVICE_ECHO_ENV)
    result = vmcalls.call("vm1", "--buffer-size=8192", "vm2", "test.Env+arg", input=b"x" * 200_000)
    assert result.returncode == 3, result.stderr
    assert result.stdout.decode().splitlines()[0] == "arg=arg"
    # The service prints 7 header lines (one is the user name, which may contain an "x") and
    # then copies its input: the payload must arrive whole and unchanged.
    assert result.stdout.split(b"\n", 7)[7] == b"x" * 200_000
    log = vmcalls.system.log_text("agent", "vm1")
    assert f"protocol version {cap}" in log
    # v2's fixed fields hold 63 bytes of service name; v3 carries any length.
    long_arg = "a" * 80
    result = vmcalls.call("vm1", "vm2", f"test.Env+{long_arg}")
    if cap == "2":
        assert result.returncode == 126
        assert len(vmcalls.audit()) == 1  # refused by the agent: dom0 was never asked
    else:
        assert result.returncode == 3
        assert result.stdout.decode().splitlines()[0] == f"arg={long_arg}"


def test_policy_program_fallback(vmcalls: VmCallSystem) -> None:
    """No policy daemon socket: the daemon runs qrexec-policy-exec instead."""
    vmcalls.write_policy("test.Env * vm1 vm2 allow\n")
    missing = {"QREXEC_POLICY_SOCKET": str(vmcalls.base / "no-policy.sock")}
    vmcalls.start_vm("vm1", 1, daemon_env=missing)
    vmcalls.start_vm("vm2", 2, daemon_env=missing)
    vmcalls.vms["vm2"].write_service("test.Env", SERVICE_ECHO_ENV)
    result = vmcalls.call("vm1", "vm2", "test.Env+fb")
    assert result.returncode == 3, result.stderr
    assert result.stdout.decode().splitlines()[0] == "arg=fb"
    denied = vmcalls.call("vm1", "vm2", "test.Other")
    assert denied.returncode == 126
    assert [d["channel"] for d in vmcalls.audit()] == ["exec", "exec"]


def test_client_gone_before_answer(vmcalls: VmCallSystem) -> None:
    """The caller disappears while the policy is still deciding; nothing gets stuck.

    The policy program (fallback) takes two seconds; the client is killed once it has been
    asked. The late allow reaches the agent, which finds the client gone and ends the call
    at once.
    """
    slow = vmcalls.base / "slow-policy"
    asked = vmcalls.base / "policy-asked"
    slow.write_text(
        f"#!/bin/sh\ntouch {asked}\nsleep 2\n"
        "printf 'result=allow\\nuser=DEFAULT\\ntarget=vm2\\n"
        "autostart=False\\nrequested_target=vm2\\n'\n"
    )
    slow.chmod(0o755)
    missing = {"QREXEC_POLICY_SOCKET": str(vmcalls.base / "no-policy.sock")}
    vmcalls.start_vm("vm1", 1, daemon_env=missing, daemon_args=["-p", str(slow)])
    vmcalls.start_vm("vm2", 2, daemon_env=missing, daemon_args=["-p", str(slow)])
    marker = vmcalls.vms["vm2"].write_service("test.Marker", MARKER_SERVICE)
    client = vmcalls.popen_call("vm1", "vm2", "test.Marker")
    processes.wait_for(asked.exists, 60, what="the policy program to be asked")
    client.kill()
    client.wait()
    # The next call (also through the slow policy) works normally.
    result = vmcalls.call("vm1", "vm2", "test.Marker")
    assert (result.returncode, result.stdout) == (0, b"ran\n"), result.stderr
    assert Path(f"{marker}.ran").exists()
    agent_log = vmcalls.system.log_text("agent", "vm1")
    daemon_log = vmcalls.system.log_text("daemon", "vm1")
    assert "Traceback" not in agent_log + daemon_log


def test_usage_and_agent_errors(vmcalls: VmCallSystem) -> None:
    vmcalls.start_vm("vm1", 1)
    assert vmcalls.call("vm1", "vm2").returncode == 2
    assert vmcalls.call("vm1", "--bogus-option", "vm2", "svc").returncode == 2
    # A long target is cut to 63 bytes, not a usage error (spec §15.7); policy refuses it.
    assert vmcalls.call("vm1", "x" * 64, "svc").returncode == 126
    assert vmcalls.call("vm1", "vm2", "+arg").returncode == 2
    help_run = vmcalls.call("vm1", "-h")
    assert help_run.returncode == 0 and b"usage" in help_run.stdout
    no_agent = vmcalls.call("vm1", "-a", str(vmcalls.base / "nothing"), "vm2", "svc")
    assert no_agent.returncode == 125
    assert os.fsencode(str(vmcalls.base / "nothing")) in no_agent.stderr


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x00\x01\x02\x03\x04\x05\x06\x07",  # unknown type
        struct.pack("<II", 0x200, 20) + b"x" * 20,  # EXEC_CMDLINE is no trigger
        struct.pack("<II", 0x213, 70000) + b"x" * 100,  # over the length cap
        struct.pack("<II", 0x212, 100) + b"y" * 100,  # name without NUL
    ],
    ids=["unknown-type", "wrong-type", "oversize", "no-nul"],
)
def test_trigger_socket_garbage_is_dropped(vmcalls: VmCallSystem, garbage: bytes) -> None:
    """A local program sending junk to the agent's trigger socket only loses its socket."""
    two_vms(vmcalls, "test.Marker * vm1 vm2 allow\n")
    vmcalls.vms["vm2"].write_service("test.Marker", MARKER_SERVICE)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(20)
        sock.connect(str(vmcalls.agent_socket("vm1")))
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(garbage)
        with contextlib.suppress(ConnectionResetError):
            assert sock.recv(8) == b""
    assert vmcalls.audit() == []
    result = vmcalls.call("vm1", "vm2", "test.Marker")
    assert (result.returncode, result.stdout) == (0, b"ran\n"), result.stderr


UPPER_SERVICE = """#!/bin/sh
tr a-z A-Z
exit "${1:-0}"
"""


@pytest.mark.parametrize(
    ("remote", "local", "expected"), [("0", "5", 5), ("4", "5", 4), ("0", "0", 0)]
)
def test_local_program_wiring_and_exit_code(
    vmcalls: VmCallSystem, remote: str, local: str, expected: int
) -> None:
    """LOCAL_PROGRAM's stdout feeds the service, the service's stdout feeds it back;
    SAVED_FD_0/1 (and _2 with PASS_LOCAL_STDERR) are our original descriptors; the exit
    code is the remote one unless that is 0."""
    two_vms(vmcalls, "test.Upper * vm1 vm2 allow\n")
    vmcalls.vms["vm2"].write_service("test.Upper", UPPER_SERVICE)
    program = vmcalls.vms["vm1"].write_file(
        "usr/bin/local-side",
        "#!/bin/sh\n"
        'echo "hello from local"\n'
        "exec 1>&-\n"
        'read answer\necho "got: $answer" >&$SAVED_FD_1\n'
        'echo "saved2=${SAVED_FD_2-unset}" >&2\n'
        "cat <&$SAVED_FD_0 >&$SAVED_FD_1\n"
        f"exit {local}\n",
        0o755,
    )
    assert program.exists()
    result = vmcalls.call(
        "vm1",
        "vm2",
        f"test.Upper+{remote}",
        "/usr/bin/local-side",
        input=b"our own stdin\n",
        env={"PASS_LOCAL_STDERR": "1"},
    )
    assert result.returncode == expected, result.stderr
    assert result.stdout == b"got: HELLO FROM LOCAL\nour own stdin\n"
    saved2 = result.stderr.decode().strip().rsplit("=", 1)[1]
    assert saved2.isdigit()


def test_use_stdin_socket(vmcalls: VmCallSystem) -> None:
    two_vms(vmcalls, "test.Upper * vm1 vm2 allow\n")
    vmcalls.vms["vm2"].write_service("test.Upper", UPPER_SERVICE)
    ours, theirs = socket.socketpair()
    with ours, theirs:
        proc = subprocess.Popen(
            vmcalls.client_vm_argv("--use-stdin-socket", "vm2", "test.Upper"),
            stdin=theirs,
            stderr=subprocess.PIPE,
            env=vmcalls.vm_env("vm1"),
        )
        theirs.close()
        ours.sendall(b"over one socket\n")
        ours.shutdown(socket.SHUT_WR)
        ours.settimeout(60)
        received = b""
        while chunk := ours.recv(4096):
            received += chunk
        assert proc.wait(60) == 0, proc.stderr.read() if proc.stderr else b""
    assert received == b"OVER ONE SOCKET\n"


ESCAPES_SERVICE = """#!/bin/sh
printf 'out\\033[31m\\007\\n'
printf 'err\\033]0;title\\n' >&2
"""


@pytest.mark.parametrize(
    ("options", "expect_out", "expect_err"),
    [
        ((), b"out_[31m\x07", b"err_]0;title"),  # a terminal: both filtered by default
        (("--no-filter-escape-chars-stdout",), b"out\x1b[31m\x07", b"err_]0;title"),
        (("--no-filter-escape-chars-stderr",), b"out_[31m\x07", b"err\x1b]0;title"),
    ],
)
def test_escape_filtering_on_a_terminal(
    vmcalls: VmCallSystem, options: tuple[str, ...], expect_out: bytes, expect_err: bytes
) -> None:
    two_vms(vmcalls, "test.Esc * vm1 vm2 allow\n")
    vmcalls.vms["vm2"].write_service("test.Esc", ESCAPES_SERVICE)
    out_master, out_slave = pty.openpty()
    err_master, err_slave = pty.openpty()
    for fd in (out_slave, err_slave):
        attrs = termios.tcgetattr(fd)
        attrs[1] &= ~termios.OPOST  # no CRLF translation: compare raw bytes
        termios.tcsetattr(fd, termios.TCSANOW, attrs)
    proc = subprocess.Popen(
        vmcalls.client_vm_argv(*options, "vm2", "test.Esc"),
        stdin=subprocess.DEVNULL,
        stdout=out_slave,
        stderr=err_slave,
        env=vmcalls.vm_env("vm1"),
    )
    os.close(out_slave)
    os.close(err_slave)
    outputs = []
    for master in (out_master, err_master):
        data = b""
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the client closed its side of the terminal
                break
            if not chunk:
                break
            data += chunk
        os.close(master)
        outputs.append(data)
    assert proc.wait(60) == 0
    assert outputs[0].splitlines()[0] == expect_out
    assert outputs[1].splitlines()[0] == expect_err


def test_daemon_restart_refuses_waiting_calls_and_serves_again(vmcalls: VmCallSystem) -> None:
    """dom0's daemon of the calling VM dies while a call waits for policy: the caller is
    refused at once (nobody will answer); the restarted daemon serves new calls."""
    slow = vmcalls.base / "slow-policy"
    asked = vmcalls.base / "policy-asked"
    slow.write_text(
        f"#!/bin/sh\ntouch {asked}\nsleep 30\n"
        "printf 'result=allow\\nuser=DEFAULT\\ntarget=vm2\\n"
        "autostart=False\\nrequested_target=vm2\\n'\n"
    )
    slow.chmod(0o755)
    missing = {"QREXEC_POLICY_SOCKET": str(vmcalls.base / "no-policy.sock")}
    vmcalls.start_vm("vm1", 1, daemon_env=missing, daemon_args=["-p", str(slow)])
    vmcalls.write_policy("test.Marker * vm1 vm2 allow\n")
    vmcalls.start_policy_daemon()
    vmcalls.start_vm("vm2", 2)
    vmcalls.vms["vm2"].write_service("test.Marker", MARKER_SERVICE)
    waiting = vmcalls.popen_call("vm1", "vm2", "test.Marker")
    processes.wait_for(asked.exists, 60, what="the policy program to be asked")
    system = vmcalls.system
    vm1 = system.domains["vm1"]
    assert vm1.daemon is not None
    system.stop(vm1.daemon)
    _, err = waiting.communicate(timeout=20)
    assert waiting.returncode == 126, err
    # A new daemon (with the policy daemon this time) serves the same agent.
    system.start_daemon("vm1", 1, vmcalls.dom0_env(), args=["-u", vm_uuid(1)])
    system.wait_connected(vm1)
    result = vmcalls.call("vm1", "vm2", "test.Marker")
    assert (result.returncode, result.stdout) == (0, b"ran\n"), result.stderr
