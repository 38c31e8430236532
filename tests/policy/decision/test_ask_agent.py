"""The policy.Ask / policy.Notify socket-service protocol, against the reference agent."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qrexec.errors import TransportBroken
from qrexec.policy.decision.agent_client import PolicyAgentClient, PolicyAskPrompter
from qrexec.policy.decision.ask import AskPrompt, ScriptedPrompter, parse_ask_answer
from qrexec.policy.decision.notify import AgentNotifier, Notification
from qrexec.policy.decision.policy_agent import PolicyAgent
from qrexec.policy.decision.socket_service import (
    ServiceDescriptor,
    parse_descriptor,
    qrexec_client_command,
    start_unix_service,
)

PROMPT = AskPrompt("work", "test.Add", "+", ("vm2", "vm3"), requested_target="vm2")


def _script(tmp_path: Path, text: str) -> str:
    path = tmp_path / "answers"
    path.write_text(text)
    return str(path)


def test_ask_and_notify_through_the_reference_agent(tmp_path: Path) -> None:
    sock = str(tmp_path / "agent.sock")
    notify_log = tmp_path / "notify.jsonl"
    agent = PolicyAgent(
        ScriptedPrompter(_script(tmp_path, "test.Add * work allow:vm3\n")), str(notify_log)
    )

    async def run() -> tuple[bytes, bytes]:
        server = await start_unix_service(sock, agent.handle)
        try:
            client = PolicyAgentClient(sock, "unused")
            answer = await PolicyAskPrompter(client).ask(PROMPT, "dom0")
            other = await PolicyAskPrompter(client).ask(
                AskPrompt("mail", "test.Add", "+", ("vm2",)), "dom0"
            )
            await AgentNotifier(client).notify(
                Notification("deny", "test.Add", "+", "work", "vm2"), "dom0"
            )
            return answer, other
        finally:
            server.close()
            await server.wait_closed()

    answer, other = asyncio.run(run())
    assert parse_ask_answer(answer, PROMPT) == "vm3"
    assert other == b"deny"
    assert [json.loads(line) for line in notify_log.read_text().splitlines()] == [
        {
            "resolution": "deny",
            "service": "test.Add",
            "argument": "+",
            "source": "work",
            "target": "vm2",
        }
    ]
    assert (os.stat(sock).st_mode & 0o777) == 0o660


def test_agent_drops_garbage_and_keeps_serving(tmp_path: Path) -> None:
    sock = str(tmp_path / "agent.sock")
    agent = PolicyAgent(ScriptedPrompter(_script(tmp_path, "* * * allow\n")))

    async def raw_call(data: bytes) -> bytes:
        reader, writer = await asyncio.open_unix_connection(sock)
        writer.write(data)
        writer.write_eof()
        reply = await reader.read()
        writer.close()
        return reply

    async def run() -> list[bytes]:
        server = await start_unix_service(sock, agent.handle)
        try:
            replies = [
                await raw_call(b"no descriptor terminator"),
                await raw_call(b"policy.Ask dom0\0{not json"),
                await raw_call(b"other.Service dom0\0{}"),
                await raw_call(b"policy.Ask dom0 keyword adminvm\0" + PROMPT.to_json()),
            ]
            return replies
        finally:
            server.close()
            await server.wait_closed()

    assert asyncio.run(run()) == [b"", b"", b"", b"allow:vm2"]


def test_remote_guivm_goes_through_qrexec_client(tmp_path: Path) -> None:
    """For a GuiVM other than dom0 the client runs ``qrexec-client -d GUIVM
    DEFAULT:QUBESRPC policy.Ask dom0``, with the prompt on stdin."""
    record = tmp_path / "argv"
    stdin_copy = tmp_path / "stdin"
    fake = tmp_path / "qrexec-client"
    fake.write_text(
        f'#!/bin/sh\nprintf "%s\\n" "$@" > {record}\ncat > {stdin_copy}\nprintf \'allow:vm3\'\n'
    )
    fake.chmod(0o755)
    client = PolicyAgentClient(str(tmp_path / "no-local-socket"), str(fake))
    answer = asyncio.run(PolicyAskPrompter(client).ask(PROMPT, "sys-gui"))
    assert answer == b"allow:vm3"
    assert record.read_text().splitlines() == [
        "-d",
        "sys-gui",
        "DEFAULT:QUBESRPC policy.Ask dom0",
    ]
    assert json.loads(stdin_copy.read_bytes())["targets"] == ["vm2", "vm3"]

    failing = tmp_path / "failing-client"
    failing.write_text("#!/bin/sh\nexit 126\n")
    failing.chmod(0o755)
    with pytest.raises(TransportBroken, match="exited with 126"):
        asyncio.run(
            PolicyAgentClient("", str(failing)).call("sys-gui", "policy.Ask", b"{}", max_reply=10)
        )


def test_missing_local_agent_is_a_transport_error(tmp_path: Path) -> None:
    client = PolicyAgentClient(str(tmp_path / "absent.sock"), "qrexec-client")
    with pytest.raises(TransportBroken, match="cannot connect"):
        asyncio.run(PolicyAskPrompter(client).ask(PROMPT, "dom0"))


def test_descriptor_codec() -> None:
    d = parse_descriptor(b"policy.EvalSimple+qubes.Filecopy vm1 name dom0")
    assert d == ServiceDescriptor("policy.EvalSimple", "qubes.Filecopy", "vm1", "name", "dom0")
    assert d.encode() == b"policy.EvalSimple+qubes.Filecopy vm1 name dom0\0"
    vm = parse_descriptor(b"policy.Ask dom0")
    assert (vm.has_plus, vm.argument, vm.target) == (False, "", None)
    assert vm.encode() == b"policy.Ask dom0\0"
    for bad in (b"one", b"a b c", b"a b weird t", b"+x src", b"a  b", b"s\xff src"):
        with pytest.raises(Exception, match="descriptor"):
            parse_descriptor(bad)
    assert qrexec_client_command("/usr/bin/qrexec-client", "gui", "policy.Notify") == [
        "/usr/bin/qrexec-client",
        "-d",
        "gui",
        "DEFAULT:QUBESRPC policy.Notify dom0",
    ]
    with pytest.raises(Exception, match="domain"):
        qrexec_client_command("qrexec-client", "gui vm", "policy.Ask")


@pytest.mark.timeout(60)
def test_agent_as_a_process(tmp_path: Path) -> None:
    sock = tmp_path / "agent.sock"
    answers = _script(tmp_path, "* * * allow:vm3\n")
    log = tmp_path / "agent.log"
    with log.open("wb") as log_file:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "qrexec.policy.decision.policy_agent",
                "-s",
                str(sock),
                "--answer",
                f"scripted:{answers}",
                "-q",
            ],
            stderr=log_file,
        )
    try:
        for _ in range(500):
            if sock.exists() or proc.poll() is not None:
                break
            time.sleep(0.02)
        assert proc.poll() is None, log.read_text()
        client = PolicyAgentClient(str(sock), "unused")
        assert asyncio.run(PolicyAskPrompter(client).ask(PROMPT, "dom0")) == b"allow:vm3"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    assert not sock.exists()
