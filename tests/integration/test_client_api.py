"""The in-process client API (qrexec.client.api): both faces, both sides, every exit-code
class, timeouts, many calls at once, and an agent that dies mid-call."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from qrexec.client.api import DEVNULL, CallResult, Dom0Client, VmClient
from qrexec.errors import (
    CallFailed,
    CallProblem,
    CallRefused,
    CallServiceNotFound,
    CallTimeout,
    QrexecError,
)
from qrexec.sim import processes
from tests.integration.conftest import Domain, QrexecSystem
from tests.integration.vmcall_support import VmCallSystem, vmcalls

pytestmark = pytest.mark.timeout(180)
__all__ = ["vmcalls"]


def dom0(system: QrexecSystem) -> Dom0Client:
    return Dom0Client(system.env(0))


def test_blocking_run_captures_output_and_exit_code(
    qrexec_system: QrexecSystem, vm1: Domain
) -> None:
    user = qrexec_system.user
    result = dom0(qrexec_system).run("vm1", f"{user}:cat; echo err >&2; exit 3", input=b"hello")
    assert result == CallResult(f"vm1 {user}:cat; echo err >&2; exit 3", 3, b"hello", b"err\n")


def test_input_as_stream_and_output_to_a_callable(qrexec_system: QrexecSystem, vm1: Domain) -> None:
    chunks: list[bytes] = []

    async def source():  # type: ignore[no-untyped-def]
        for n in range(50):
            yield b"%d\n" % n

    async def main() -> CallResult:
        return await dom0(qrexec_system).arun(
            "vm1",
            f"{qrexec_system.user}:cat",
            input=source(),
            stdout=chunks.append,
            stderr=DEVNULL,
        )

    result = asyncio.run(main())
    assert result.returncode == 0 and result.stdout is None and result.stderr is None
    assert b"".join(chunks) == b"".join(b"%d\n" % n for n in range(50))


def test_service_call_and_not_found_code(qrexec_system: QrexecSystem, vm1: Domain) -> None:
    vm1.write_service("test.Api", '#!/bin/sh\necho "arg=$1 from=$QREXEC_REMOTE_DOMAIN"\n')
    client = dom0(qrexec_system)
    assert client.call("vm1", "test.Api+x", check=True).stdout == b"arg=x from=dom0\n"
    missing = client.call("vm1", "test.Missing")
    assert missing.returncode == 127
    with pytest.raises(CallServiceNotFound) as info:
        client.call("vm1", "test.Missing", check=True)
    assert info.value.result == missing


def test_check_raises_carrying_the_result(qrexec_system: QrexecSystem, vm1: Domain) -> None:
    client = dom0(qrexec_system)
    with pytest.raises(CallFailed) as info:
        client.run("vm1", f"{qrexec_system.user}:echo out; exit 5", check=True)
    assert isinstance(info.value.result, CallResult)
    assert info.value.result.stdout == b"out\n" and info.value.result.returncode == 5
    with pytest.raises(CallProblem):
        client.run("vm1", f"{qrexec_system.user}:exit 125", check=True)


def test_just_exec_returns_the_code_only(qrexec_system: QrexecSystem, vm1: Domain) -> None:
    result = dom0(qrexec_system).run("vm1", f"{qrexec_system.user}:true", just_exec=True)
    assert result.returncode == 0


def test_no_daemon_raises(qrexec_system: QrexecSystem) -> None:
    with pytest.raises(QrexecError, match="cannot connect to the qrexec daemon"):
        dom0(qrexec_system).run("nosuchvm", "user:true")


def test_timeout_raises(qrexec_system: QrexecSystem, vm1: Domain) -> None:
    with pytest.raises(CallTimeout):
        dom0(qrexec_system).run("vm1", f"{qrexec_system.user}:sleep 30", timeout=0.5)
    # The VM still serves calls after the abandoned one.
    assert dom0(qrexec_system).run("vm1", f"{qrexec_system.user}:echo ok").stdout == b"ok\n"


def test_blocking_face_refuses_to_run_inside_a_loop(qrexec_system: QrexecSystem) -> None:
    async def main() -> None:
        dom0(qrexec_system).run("vm1", "user:true")

    with pytest.raises(QrexecError, match="inside an event loop"):
        asyncio.run(main())


CONCURRENT = """
import asyncio, sys
from qrexec.client.api import Dom0Client
async def main():
    client = Dom0Client()
    results = await asyncio.gather(
        *(client.arun("vm1", f"{sys.argv[1]}:echo {n}") for n in range(100))
    )
    assert [r.stdout for r in results] == [b"%d\\n" % n for n in range(100)], results
    assert all(r.returncode == 0 for r in results)
def peak_kib():
    # VmHWM, not ru_maxrss: the latter keeps the forking parent's peak across exec.
    with open("/proc/self/status") as status:
        return next(int(l.split()[1]) for l in status if l.startswith("VmHWM:"))
before = peak_kib()
asyncio.run(main())
print(before, peak_kib())
"""


def test_hundred_concurrent_calls_with_bounded_memory(
    qrexec_system: QrexecSystem, vm1: Domain
) -> None:
    """100 calls in flight from one fresh process, whose peak RSS stays under 60 MiB."""
    done = subprocess.run(
        [sys.executable, "-c", CONCURRENT, qrexec_system.user],
        env=qrexec_system.env(0),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    before_kib, peak_kib = map(int, done.stdout.split()[-2:])
    assert peak_kib < 60 * 1024, f"peak RSS {peak_kib} KiB ({before_kib} KiB before the calls)"


def test_agent_dying_mid_call_raises(qrexec_system: QrexecSystem, vm1: Domain) -> None:
    user = qrexec_system.user
    marker = qrexec_system.base / "started"

    async def main() -> None:
        call = asyncio.ensure_future(
            dom0(qrexec_system).arun("vm1", f"{user}:touch {marker}; exec sleep 60", timeout=60)
        )
        while not marker.exists():
            await asyncio.sleep(0.02)
        assert vm1.agent is not None
        processes.stop([vm1.agent])
        with pytest.raises(QrexecError):
            await call

    asyncio.run(main())


# --- VM side ------------------------------------------------------------------------------


def two_vms(vmcalls: VmCallSystem) -> None:
    vmcalls.write_policy(
        "test.Echo * vm1 vm2 allow\ntest.Denied * vm1 vm2 deny notify=no\n"
        "test.Gone * vm1 vm2 allow\n"
    )
    vmcalls.start_policy_daemon()
    vmcalls.start_vm("vm1", 1)
    vm2 = vmcalls.start_vm("vm2", 2)
    vm2.write_service("test.Echo", '#!/bin/sh\necho "$1:$QREXEC_REMOTE_DOMAIN"\ncat\n')


def test_vm_side_call_refused_and_not_found(vmcalls: VmCallSystem) -> None:
    two_vms(vmcalls)
    client = VmClient(vmcalls.vm_env("vm1"))
    ok = client.call("vm2", "test.Echo+a", input=b"data", check=True)
    assert ok.stdout == b"a:vm1\ndata"
    refused = client.call("vm2", "test.Denied")
    assert refused.returncode == 126
    with pytest.raises(CallRefused):
        client.call("vm2", "test.Denied", check=True)
    assert client.call("vm2", "test.Gone").returncode == 127


def test_vm_side_async_concurrent_calls(vmcalls: VmCallSystem) -> None:
    two_vms(vmcalls)
    client = VmClient(vmcalls.vm_env("vm1"))

    async def main() -> list[CallResult]:
        return await asyncio.gather(
            *(client.acall("vm2", f"test.Echo+n{n}", input=b"%d" % n) for n in range(20))
        )

    results = asyncio.run(main())
    assert [r.stdout for r in results] == [b"n%d:vm1\n%d" % (n, n) for n in range(20)]


def test_vm_side_without_agent_raises(vmcalls: VmCallSystem) -> None:
    env = {"QREXEC_AGENT_SOCKET": os.fspath(vmcalls.base / "nothing.sock")}
    with pytest.raises(QrexecError, match="cannot connect to the qrexec agent"):
        VmClient(vmcalls.system.env(1, env)).call("vm2", "test.Echo")


def test_a_failing_input_source_is_raised_after_the_call_ends(
    qrexec_system: QrexecSystem, vm1: Domain
) -> None:
    def broken() -> Iterator[bytes]:
        yield b"part"
        raise ValueError("input source broke")

    with pytest.raises(ValueError, match="input source broke"):
        dom0(qrexec_system).run("vm1", f"{qrexec_system.user}:cat", input=broken())
    # The service got EOF and the VM serves the next call.
    assert dom0(qrexec_system).run("vm1", f"{qrexec_system.user}:echo ok").stdout == b"ok\n"


def test_service_ignoring_its_input_is_not_a_failure(
    qrexec_system: QrexecSystem, vm1: Domain
) -> None:
    result = dom0(qrexec_system).run(
        "vm1", f"{qrexec_system.user}:exec true", input=b"x" * (8 << 20)
    )
    assert result.returncode == 0
