"""The per-stage trace (QREXEC_TRACE=1) and the merge tool that turns it into timelines."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from qrexec import trace
from qrexec.client.api import Dom0Client, VmClient
from qrexec.trace_merge import group_calls, merge, parse_lines
from tests.integration.conftest import QrexecSystem
from tests.integration.vmcall_support import VmCallSystem, vmcalls

pytestmark = pytest.mark.timeout(180)
__all__ = ["vmcalls"]


def traced(system: QrexecSystem) -> Path:
    path = system.base / "trace.log"
    system.common_env.update(QREXEC_TRACE="1", QREXEC_TRACE_FILE=str(path))
    return path


def settled(path: Path, stage: str, count: int) -> str:
    """The trace once ``count`` lines of ``stage`` are in it (a server may write its last
    lines just after the client has its answer and exits)."""
    deadline = time.monotonic() + 10
    while True:
        text = path.read_text()
        if text.count(f" {stage}") >= count or time.monotonic() > deadline:
            return text
        time.sleep(0.02)


def stages(call: list[object]) -> list[str]:
    return [line.stage for line in call]  # type: ignore[attr-defined]


def in_order(found: list[str], expected: list[str]) -> bool:
    position = 0
    for stage in found:
        if position < len(expected) and stage == expected[position]:
            position += 1
    return position == len(expected)


CLI_STAGES = [
    "client.start",
    "client.daemon_connected",
    "daemon.port_allocated",
    "agent.exec_request",
    "agent.child_started",
    "client.exit_code",
    "client.teardown",
]


def test_cli_call_gives_one_timeline_per_call(qrexec_system: QrexecSystem) -> None:
    path = traced(qrexec_system)
    qrexec_system.start_vm("vm1", 1)
    for text in ("one", "two"):
        done = qrexec_system.client("vm1", f"{qrexec_system.user}:echo {text}")
        assert done.returncode == 0 and done.stdout == f"{text}\n".encode()
    text = settled(path, "agent.teardown", 2)
    calls, _ = group_calls(parse_lines(text.splitlines()))
    # Both calls used the same port: still two timelines, each whole.
    assert len(calls) == 2
    for call in calls:
        found = stages(call)
        assert in_order(found, CLI_STAGES), found
        assert "agent.first_byte" in found and "agent.exit_code_sent" in found
        programs = {line.program for line in call}
        assert len({line.pid for line in call}) == 3, programs
    printed = merge([text])
    assert printed.count("\ncall ") + printed.startswith("call ") == 2
    assert "client.exit_code code=0" in printed


def test_in_process_call_traces_from_its_own_process(
    qrexec_system: QrexecSystem, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = traced(qrexec_system)
    qrexec_system.start_vm("vm1", 1)
    monkeypatch.setattr(trace, "ON", True)
    monkeypatch.setattr(trace, "_fd", None)
    monkeypatch.setenv("QREXEC_TRACE_FILE", str(path))
    try:
        result = Dom0Client(qrexec_system.env(0)).run("vm1", f"{qrexec_system.user}:true")
    finally:
        if trace._fd is not None and trace._fd != 2:
            import os

            os.close(trace._fd)
    assert result.returncode == 0
    calls, _ = group_calls(parse_lines(path.read_text().splitlines()))
    assert len(calls) == 1
    assert in_order(stages(calls[0]), CLI_STAGES)


def test_off_means_no_trace_call(
    qrexec_system: QrexecSystem, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the flag off, no trace function is reached (so nothing is formatted or timed)."""
    qrexec_system.start_vm("vm1", 1)

    def explode(*args: object, **kwargs: object) -> None:
        raise AssertionError("trace.point called while tracing is off")

    monkeypatch.setattr(trace, "ON", False)
    monkeypatch.setattr(trace, "point", explode)
    result = Dom0Client(qrexec_system.env(0)).run("vm1", f"{qrexec_system.user}:echo x")
    assert result.stdout == b"x\n"


def test_vm_to_vm_call_links_policy_and_both_vms(vmcalls: VmCallSystem) -> None:
    path = traced(vmcalls.system)
    vmcalls.write_policy("test.Echo * vm1 vm2 allow\n")
    vmcalls.start_policy_daemon()
    vmcalls.start_vm("vm1", 1)
    vmcalls.start_vm("vm2", 2).write_service("test.Echo", "#!/bin/sh\necho hi\n")
    done = vmcalls.call("vm1", "vm2", "test.Echo", env={"QREXEC_TRACE": "1"})
    assert done.returncode == 0 and done.stdout == b"hi\n"
    assert VmClient(vmcalls.vm_env("vm1")).call("vm2", "test.Echo").stdout == b"hi\n"
    calls, _ = group_calls(parse_lines(path.read_text().splitlines()))
    full = [c for c in calls if "policy.asked" in stages(c)]
    assert len(full) >= 1
    expected = [
        "agent.trigger_forwarded",
        "daemon.trigger",
        "policy.asked",
        "policy.answered",
        "daemon.port_allocated",
        "agent.exec_request",
        "agent.child_started",
        "client.exit_code",
    ]
    assert in_order(stages(full[0]), expected), stages(full[0])
    assert "client.start" in stages(full[0])


def test_merge_tool_runs_as_a_module(tmp_path: Path) -> None:
    lines = [
        "qrexec-trace 1000000 qrexec-client 10 client.start call=10.0",
        "qrexec-trace 1500000 qrexec-client 10 client.port call=10.0 vchan=0-1-513",
        "noise that is not a trace line",
        "qrexec-trace 1200000 qrexec-daemon 20 daemon.port_allocated vchan=0-1-513",
        "qrexec-trace 2500000 qrexec-agent 30 agent.exec_request vchan=0-1-513",
        "qrexec-trace 9000000 qrexec-daemon 20 daemon.port_allocated vchan=0-1-513",
        "qrexec-trace 9100000 qrexec-agent 30 agent.exec_request vchan=0-1-513",
    ]
    path = tmp_path / "t.log"
    path.write_text("\n".join(lines) + "\n")
    done = subprocess.run(
        [sys.executable, "-m", "qrexec.trace_merge", str(path)],
        capture_output=True,
        text=True,
        check=True,
    )
    blocks = done.stdout.strip().split("\n\n")
    assert len(blocks) == 2
    assert blocks[0].startswith("call vchan=0-1-513: 1.500 ms")
    assert "    0.200    0.200  qrexec-daemon[20]" in blocks[0]
    assert "client.start" in blocks[0] and "client.start" not in blocks[1]
