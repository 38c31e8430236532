"""Our programs paired with Qubes' C programs in every combination (issue 11, interop (a)).

A pairing says which implementation runs the clients (qrexec-client in dom0,
qrexec-client-vm in the VMs) and, per VM, the daemon and the agent. Every scenario runs
on every pairing, and asserts what Qubes' own programs do (the all-C pairing proves the
expectations are Qubes' and the harness is right):

- ``command``: ``qrexec-client -d vm1 USER:CMD`` (stdin, stdout, stderr, exit code);
- ``service``: an executable service with an argument (argv, environment, exit code);
- ``vm_to_vm``: ``qrexec-client-vm vm2 SVC+ARG`` in vm1, allowed by policy;
- ``vm_to_dom0``: ``qrexec-client-vm dom0 SVC+ARG`` run as a dom0 service by the daemon;
- ``refused``: denied by policy: 126 and "Request refused", nothing runs;
- ``unknown``: no such service: 127, from dom0 and from a VM;
- ``large``: 64 MiB each way at once, byte-exact (sha256), dom0 → VM and VM → VM;
- ``early_close``: the service reads 5 bytes and exits 7 while the caller still sends
  megabytes: the caller gets those bytes and the code and does not hang;
- ``local_program``: ``qrexec-client-vm vm2 SVC LOCAL_PROGRAM`` (spec §15.4): the program's
  stdin and stdout are sockets, ``QREXEC_AGENT_PID`` is qrexec-client-vm's pid (its parent),
  ``SAVED_FD_0``/``SAVED_FD_1`` are set, and the remote code wins when non-zero.

The fixture is per module and pairing: one system (dom0 + vm1 + vm2) serves every scenario
of a pairing, so a pairing costs one start-up.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.interop.system import (
    InteropSystem,
    Pairing,
    Vm,
    VmSpec,
    short_temp_dir,
    vm_user,
    write_executable,
)

pytestmark = [pytest.mark.cpeer, pytest.mark.timeout(240)]

PY = VmSpec(daemon="py", agent="py")
C = VmSpec(daemon="c", agent="c")
PY_DAEMON_C_AGENT = VmSpec(daemon="py", agent="c")
C_DAEMON_PY_AGENT = VmSpec(daemon="c", agent="py")

#: Every combination of (clients, daemon, agent), plus VM → VM across the two stacks.
PAIRINGS = (
    Pairing("all-c", "c", C, C),
    Pairing("all-py", "py", PY, PY),
    Pairing("py-daemon+c-agent", "py", PY_DAEMON_C_AGENT, PY_DAEMON_C_AGENT),
    Pairing("c-daemon+py-agent", "py", C_DAEMON_PY_AGENT, C_DAEMON_PY_AGENT),
    Pairing("py-clients->c-stack", "py", C, C),
    Pairing("c-clients->py-stack", "c", PY, PY),
    Pairing("c-clients->py-daemon+c-agent", "c", PY_DAEMON_C_AGENT, PY_DAEMON_C_AGENT),
    Pairing("c-clients->c-daemon+py-agent", "c", C_DAEMON_PY_AGENT, C_DAEMON_PY_AGENT),
    Pairing("c-vm1->py-vm2", "c", C, PY),
    Pairing("py-vm1->c-vm2", "py", PY, C),
)

POLICY = """\
test.Echo * vm1 vm2 allow
test.Cat * vm1 vm2 allow
test.Early * vm1 vm2 allow
test.Missing * vm1 vm2 allow
test.Dom0 * @anyvm @adminvm allow
test.Denied * @anyvm @anyvm deny
* * @anyvm @anyvm deny
"""

SERVICE_ECHO = """#!/bin/sh
echo "arg=$1"
echo "remote=$QREXEC_REMOTE_DOMAIN"
echo "full=$QREXEC_SERVICE_FULL_NAME"
echo "argument=${QREXEC_SERVICE_ARGUMENT-unset}"
echo "user=$(id -un)"
cat
echo "to-stderr" >&2
exit 3
"""

SERVICE_DOM0 = """#!/bin/sh
echo "dom0 arg=$1"
echo "remote=$QREXEC_REMOTE_DOMAIN"
echo "full=$QREXEC_SERVICE_FULL_NAME"
echo "type=$QREXEC_REQUESTED_TARGET_TYPE target=${QREXEC_REQUESTED_TARGET-unset}"
cat
exit 5
"""

SERVICE_CAT = "#!/bin/sh\nexec cat\n"
SERVICE_EARLY = "#!/bin/sh\nhead -c 5\nexit 7\n"
SERVICE_DENIED = '#!/bin/sh\necho ran > "$0.ran"\n'

#: A local program for qrexec-client-vm: talks to the service, then reports on stderr.
LOCAL_PROGRAM = """#!/bin/sh
echo ping
read -r reply
[ -S /dev/stdin ] && s0=socket || s0=other
[ -S /dev/stdout ] && s1=socket || s1=other
[ "$QREXEC_AGENT_PID" = "$PPID" ] && pid=client-vm || pid="other:$QREXEC_AGENT_PID"
echo "report $reply $s0 $s1 $pid saved=${SAVED_FD_0:+0}${SAVED_FD_1:+1}" >&2
exit 9
"""

LARGE = 64 * 1024 * 1024


@pytest.fixture(scope="module", params=PAIRINGS, ids=lambda p: p.name)
def system(
    request: pytest.FixtureRequest, c_peer_bin: Path
) -> Iterator[tuple[InteropSystem, Pairing]]:
    pairing: Pairing = request.param
    with short_temp_dir() as base:
        sys_ = InteropSystem(base, c_peer_bin)
        try:
            sys_.write_policy(POLICY)
            sys_.write_dom0_service("test.Dom0", SERVICE_DOM0)
            for name, domid, spec in (("vm1", 1, pairing.vm1), ("vm2", 2, pairing.vm2)):
                vm = sys_.start_vm(name, domid, spec)
                vm.write_service("test.Echo", SERVICE_ECHO)
                vm.write_service("test.Cat", SERVICE_CAT)
                vm.write_service("test.Early", SERVICE_EARLY)
                vm.write_service("test.Denied", SERVICE_DENIED)
            yield sys_, pairing
        finally:
            sys_.stop_all()


def diagnose(sys_: InteropSystem, result: object) -> str:
    logs = "\n".join(
        f"--- {role}.{name}:\n{sys_.log_text(role, name)[-1500:]}"
        for role in ("daemon", "agent")
        for name in sys_.vms
    )
    return f"{result!r}\n{logs}"


def vms(sys_: InteropSystem) -> tuple[Vm, Vm]:
    return sys_.vms["vm1"], sys_.vms["vm2"]


def test_command(system: tuple[InteropSystem, Pairing]) -> None:
    sys_, pairing = system
    cmd = f"{vm_user()}:echo out; echo err >&2; cat; exit 4"
    result = sys_.client(pairing.client, "vm1", cmd, input=b"in\n")
    assert (result.returncode, result.stdout) == (4, b"out\nin\n"), diagnose(sys_, result)
    assert b"err\n" in result.stderr


def test_service_with_argument(system: tuple[InteropSystem, Pairing]) -> None:
    sys_, pairing = system
    cmd = f"{vm_user()}:QUBESRPC test.Echo+a1 dom0"
    result = sys_.client(pairing.client, "vm1", cmd, input=b"stdin\n")
    expected = (
        f"arg=a1\nremote=dom0\nfull=test.Echo+a1\nargument=a1\nuser={vm_user()}\nstdin\n"
    ).encode()
    assert (result.returncode, result.stdout) == (3, expected), diagnose(sys_, result)
    assert b"to-stderr\n" in result.stderr


def test_vm_to_vm(system: tuple[InteropSystem, Pairing]) -> None:
    sys_, pairing = system
    vm1, _ = vms(sys_)
    result = sys_.client_vm(pairing.client, vm1, "vm2", "test.Echo+a2", input=b"from vm1\n")
    expected = (
        f"arg=a2\nremote=vm1\nfull=test.Echo+a2\nargument=a2\nuser={vm_user()}\nfrom vm1\n"
    ).encode()
    assert (result.returncode, result.stdout) == (3, expected), diagnose(sys_, result)
    assert b"to-stderr\n" in result.stderr


def test_vm_to_dom0(system: tuple[InteropSystem, Pairing]) -> None:
    sys_, pairing = system
    vm1, _ = vms(sys_)
    result = sys_.client_vm(pairing.client, vm1, "dom0", "test.Dom0+x", input=b"up\n")
    expected = b"dom0 arg=x\nremote=vm1\nfull=test.Dom0+x\ntype=name target=dom0\nup\n"
    assert (result.returncode, result.stdout) == (5, expected), diagnose(sys_, result)


def test_refused(system: tuple[InteropSystem, Pairing]) -> None:
    sys_, pairing = system
    vm1, vm2 = vms(sys_)
    result = sys_.client_vm(pairing.client, vm1, "vm2", "test.Denied", input=b"x")
    assert result.returncode == 126, diagnose(sys_, result)
    assert b"Request refused" in result.stderr
    assert result.stdout == b""
    assert not (vm2.services / "test.Denied.ran").exists()


def test_unknown_service(system: tuple[InteropSystem, Pairing]) -> None:
    sys_, pairing = system
    vm1, _ = vms(sys_)
    from_dom0 = sys_.client(pairing.client, "vm1", f"{vm_user()}:QUBESRPC test.Missing dom0")
    assert (from_dom0.returncode, from_dom0.stdout) == (127, b""), diagnose(sys_, from_dom0)
    from_vm = sys_.client_vm(pairing.client, vm1, "vm2", "test.Missing")
    assert (from_vm.returncode, from_vm.stdout) == (127, b""), diagnose(sys_, from_vm)


def test_large_streams(system: tuple[InteropSystem, Pairing]) -> None:
    sys_, pairing = system
    vm1, _ = vms(sys_)
    data = os.urandom(LARGE)
    digest = hashlib.sha256(data).hexdigest()
    from_dom0 = sys_.client(
        pairing.client, "vm1", f"{vm_user()}:QUBESRPC test.Cat dom0", input=data, timeout=180
    )
    assert from_dom0.returncode == 0, diagnose(sys_, from_dom0.stderr)
    assert len(from_dom0.stdout) == LARGE
    assert hashlib.sha256(from_dom0.stdout).hexdigest() == digest
    from_vm = sys_.client_vm(pairing.client, vm1, "vm2", "test.Cat", input=data, timeout=180)
    assert from_vm.returncode == 0, diagnose(sys_, from_vm.stderr)
    assert len(from_vm.stdout) == LARGE
    assert hashlib.sha256(from_vm.stdout).hexdigest() == digest


def test_early_close(system: tuple[InteropSystem, Pairing]) -> None:
    sys_, pairing = system
    vm1, _ = vms(sys_)
    data = os.urandom(4 * 1024 * 1024)
    from_dom0 = sys_.client(
        pairing.client, "vm1", f"{vm_user()}:QUBESRPC test.Early dom0", input=data
    )
    assert (from_dom0.returncode, from_dom0.stdout) == (7, data[:5]), diagnose(sys_, from_dom0)
    from_vm = sys_.client_vm(pairing.client, vm1, "vm2", "test.Early", input=data)
    assert (from_vm.returncode, from_vm.stdout) == (7, data[:5]), diagnose(sys_, from_vm)


def test_local_program(system: tuple[InteropSystem, Pairing]) -> None:
    sys_, pairing = system
    vm1, _ = vms(sys_)
    program = write_executable(vm1.root / "local-program", LOCAL_PROGRAM)
    through_cat = sys_.client_vm(pairing.client, vm1, "vm2", "test.Cat", str(program))
    report = b"report ping socket socket client-vm saved=01\n"
    # test.Cat exits 0, so the local program's code (9) is the result.
    assert (through_cat.returncode, through_cat.stdout) == (9, b""), diagnose(sys_, through_cat)
    assert report in through_cat.stderr
    # test.Echo exits 3: the remote code wins over the program's.
    through_echo = sys_.client_vm(pairing.client, vm1, "vm2", "test.Echo", str(program))
    assert through_echo.returncode == 3, diagnose(sys_, through_echo)
    assert b"report arg= socket socket client-vm saved=01\n" in through_echo.stderr
