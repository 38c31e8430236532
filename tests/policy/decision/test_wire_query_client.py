"""qrexec-daemon's policy client: the socket first, the policy program as fallback."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from qrexec.policy.decision.query_client import query_policy
from qrexec.policy.decision.socket_service import start_unix_service
from qrexec.policy.decision.wire import PolicyQuery
from tests.policy.policy_daemon_harness import PolicyTree, running_daemon

pytestmark = pytest.mark.timeout(120)

QUERY = PolicyQuery("work", "personal", "test.Allow", requested_source="")


def _program(tmp_path: Path, body: str) -> str:
    path = tmp_path / "policy-program"
    path.write_text(f'#!/bin/sh\necho "$@" > {tmp_path / "argv"}\n{body}\n')
    path.chmod(0o755)
    return str(path)


def test_socket_answer(tmp_path: Path) -> None:
    tree = PolicyTree(tmp_path)
    with running_daemon(tree):
        answer = asyncio.run(query_policy(QUERY, socket_path=str(tree.socket), policy_program=None))
    assert answer.via == "socket" and answer.problem is None
    assert answer.response.allowed and answer.response.target == "personal"


def test_missing_socket_falls_back_to_the_program(tmp_path: Path) -> None:
    program = _program(
        tmp_path,
        "printf 'result=allow\\nuser=u\\ntarget=vault\\nautostart=False\\n"
        "requested_target=personal\\n'",
    )
    answer = asyncio.run(
        query_policy(QUERY, socket_path=str(tmp_path / "absent"), policy_program=program)
    )
    assert answer.via == "program" and answer.response.target == "vault"
    # No requested_source on the command line, `--` before the positionals.
    assert (tmp_path / "argv").read_text() == "-- work personal test.Allow\n"


def test_program_exit_1_is_a_deny_with_a_problem(tmp_path: Path) -> None:
    program = _program(tmp_path, "echo result=deny; exit 1")
    answer = asyncio.run(
        query_policy(QUERY, socket_path=str(tmp_path / "absent"), policy_program=program)
    )
    assert not answer.response.allowed and "exited with 1" in str(answer.problem)


@pytest.mark.parametrize(
    "reply",
    [b"result=allow\n", b"result=deny\nresult=deny\n", b"x" * 5000, b"result=deny\0\n"],
)
def test_malformed_socket_answer_falls_back(tmp_path: Path, reply: bytes) -> None:
    sock = tmp_path / "policy.sock"
    program = _program(tmp_path, "echo result=deny")

    async def run() -> tuple[str, bool]:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\n\n")
            writer.write(reply)
            writer.close()

        server = await start_unix_service(str(sock), handler)
        try:
            answer = await query_policy(QUERY, socket_path=str(sock), policy_program=program)
            return answer.via, answer.response.allowed
        finally:
            server.close()

    assert asyncio.run(run()) == ("program", False)


def test_no_fallback_and_broken_program(tmp_path: Path) -> None:
    none = asyncio.run(query_policy(QUERY, socket_path=str(tmp_path / "a"), policy_program=""))
    assert (none.via, none.response.allowed) == ("none", False)
    garbage = _program(tmp_path, "echo not a response")
    bad = asyncio.run(query_policy(QUERY, socket_path=str(tmp_path / "a"), policy_program=garbage))
    assert (bad.via, bad.response.allowed) == ("program", False)
    assert "not key=value" in str(bad.problem)
    missing = asyncio.run(
        query_policy(QUERY, socket_path=str(tmp_path / "a"), policy_program="/nonexistent/x")
    )
    assert not missing.response.allowed and missing.problem


def test_fallback_to_our_qrexec_policy_exec(tmp_path: Path) -> None:
    tree = PolicyTree(tmp_path)
    wrapper = tmp_path / "qrexec-policy-exec"
    wrapper.write_text(
        f"#!/bin/sh\nexec {sys.executable} -m qrexec.policy.tools.exec_cli "
        f"--path {tree.policy_dir} --system-info {tree.system_info} "
        f'--legacy-policy-dir {tmp_path / "l"} --policy-2011-dir {tmp_path / "o"} "$@"\n'
    )
    wrapper.chmod(0o755)
    answer = asyncio.run(
        query_policy(QUERY, socket_path=str(tmp_path / "absent"), policy_program=str(wrapper))
    )
    assert answer.via == "program" and answer.response.allowed
    assert answer.response.target_uuid is not None
