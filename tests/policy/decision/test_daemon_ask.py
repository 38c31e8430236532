"""ask and notify through the running policy daemon: scripted answers, timeout, invalid
answers, the policy.Ask/Notify protocol against the reference agent, remote GuiVMs."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.policy.policy_daemon_harness import (
    PolicyTree,
    answer_fields,
    query,
    raw_call,
    running_daemon,
)

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def tree(tmp_path: Path) -> PolicyTree:
    return PolicyTree(tmp_path)


def test_scripted_yes_no_and_choice(tree: PolicyTree) -> None:
    tree.answers.write_text(
        "test.Ask +no work deny\ntest.Ask +pick work allow:vault\ntest.Ask * work allow\n"
    )
    with running_daemon(tree):
        yes = answer_fields(raw_call(tree.socket, query("work", "vault", "test.Ask")))
        # "yes" goes to the default target (personal), not to the requested one.
        assert (yes["result"], yes["target"]) == ("allow", "personal")
        pick = answer_fields(raw_call(tree.socket, query("work", "", "test.Ask+pick")))
        assert (pick["result"], pick["target"]) == ("allow", "vault")
        assert raw_call(tree.socket, query("work", "vault", "test.Ask+no")) == b"result=deny\n"
    results = [(r["argument"], r["result"]) for r in tree.audit_records()]
    assert results == [("+", "ask-allowed"), ("+pick", "ask-allowed"), ("+no", "ask-denied")]


def test_answer_outside_the_candidates_is_a_deny(tree: PolicyTree) -> None:
    tree.answers.write_text("* * * allow:sys-net\n")
    with running_daemon(tree):
        assert raw_call(tree.socket, query("work", "vault", "test.Ask")) == b"result=deny\n"
    (record,) = tree.audit_records()
    assert record["result"] == "ask-denied"
    assert "not a candidate" in str(record["reason"])


def test_no_answer_within_the_timeout_is_a_deny(tree: PolicyTree) -> None:
    tree.answers.write_text("test.Ask +slow * silent\n* * * allow\n")
    with running_daemon(tree, "--ask-timeout", "0.3"):
        assert raw_call(tree.socket, query("work", "vault", "test.Ask+slow")) == b"result=deny\n"
        # The daemon still answers (and asks) afterwards.
        assert raw_call(tree.socket, query("work", "vault", "test.Ask")).startswith(
            b"result=allow\n"
        )
    first = tree.audit_records()[0]
    assert first["result"] == "ask-denied" and "no answer from dom0" in str(first["reason"])


def test_a_pending_ask_does_not_hold_up_other_requests(tree: PolicyTree) -> None:
    tree.answers.write_text("test.Ask +slow * silent\n")
    with running_daemon(tree, "--ask-timeout", "30"):
        result: list[bytes] = []
        slow = threading.Thread(
            target=lambda: result.append(
                raw_call(tree.socket, query("work", "vault", "test.Ask+slow"))
            )
        )
        slow.start()
        for _ in range(20):
            assert raw_call(tree.socket, query("work", "personal", "test.Allow")).startswith(
                b"result=allow\n"
            )
        assert slow.is_alive()
        tree.answers.write_text("* * * deny\n")  # does not free the silent prompt...
        assert slow.is_alive()
    # ...stopping the daemon closes that connection without an answer.
    slow.join(30)
    assert result == [b""]


@contextmanager
def reference_agent(tmp_path: Path, answers: str) -> Iterator[tuple[Path, Path]]:
    """``qrexec-policy-agent`` as a separate process, tracked by pid."""
    sock = tmp_path / "agent.sock"
    script = tmp_path / "agent-answers"
    script.write_text(answers)
    notify_log = tmp_path / "notify.jsonl"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "qrexec.policy.decision.policy_agent",
            "-q",
            "--socket-path",
            str(sock),
            "--answer",
            f"scripted:{script}",
            "--notify-log",
            str(notify_log),
        ]
    )
    try:
        for _ in range(1000):
            if sock.exists() or proc.poll() is not None:
                break
            time.sleep(0.01)
        assert proc.poll() is None and sock.exists(), "policy agent did not start"
        yield sock, notify_log
    finally:
        proc.terminate()
        proc.wait(30)


def test_policy_ask_and_notify_against_the_reference_agent(tree: PolicyTree) -> None:
    with reference_agent(tree.root, "test.Ask * work allow:vault\n") as (agent, notify_log):
        extra = ("--ask-prompter", "policy-ask", "--notifier", "policy-notify")
        with running_daemon(tree, *extra, "--policy-agent-socket", str(agent)):
            asked = answer_fields(raw_call(tree.socket, query("work", "", "test.Ask")))
            assert (asked["result"], asked["target"]) == ("allow", "vault")
            refused = raw_call(tree.socket, query("work", "vault", "test.AskNoDefault"))
            assert refused == b"result=deny\n"
            assert raw_call(tree.socket, query("work", "vault", "test.Deny")) == b"result=deny\n"
            assert raw_call(tree.socket, query("work", "vault", "test.Quiet")) == b"result=deny\n"
            notified = raw_call(tree.socket, query("work", "personal", "test.Notify"))
            assert notified.startswith(b"result=allow\n")
            assert raw_call(tree.socket, query("work", "personal", "test.Allow")).startswith(
                b"result=allow\n"
            )
        # The daemon waits for notifications in flight before it stops.
        notes = [json.loads(line) for line in notify_log.read_text().splitlines()]
    by_service = {(n["service"], n["resolution"], n["target"]) for n in notes}
    # deny notifies by default, notify=no silences it; allow only with notify=yes; an ask
    # the user answered no to is not notified back to them.
    assert by_service == {
        ("test.Deny", "deny", "vault"),
        ("test.Notify", "allow", "personal"),
    }
    assert all(n["source"] == "work" and n["argument"] == "+" for n in notes)


def test_remote_guivm_is_asked_through_qrexec_client(tree: PolicyTree) -> None:
    """personal's GuiVM is sys-gui: the daemon runs ``qrexec-client -d sys-gui
    DEFAULT:QUBESRPC policy.Ask dom0`` and reads the answer from its stdout."""
    argv_log = tree.root / "argv"
    stdin_log = tree.root / "stdin"
    fake = tree.root / "qrexec-client"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {argv_log}\ncat > {stdin_log}\nprintf allow:work\n')
    fake.chmod(0o755)
    tree.write_policy("test.Ask * personal @anyvm ask\n")
    with running_daemon(tree, "--ask-prompter", "policy-ask", "--qrexec-client", str(fake)):
        asked = answer_fields(raw_call(tree.socket, query("personal", "work", "test.Ask")))
    assert (asked["result"], asked["target"]) == ("allow", "work")
    assert argv_log.read_text() == "-d sys-gui DEFAULT:QUBESRPC policy.Ask dom0\n"
    prompt = json.loads(stdin_log.read_text())
    assert prompt["source"] == "personal" and prompt["argument"] == "+"
    assert "work" in prompt["targets"] and "personal" not in prompt["targets"]
    assert prompt["icons"]["work"] == "appvm-red"


def test_unreachable_agent_is_a_deny(tree: PolicyTree) -> None:
    missing = tree.root / "no-agent.sock"
    extra = ("--ask-prompter", "policy-ask", "--policy-agent-socket", str(missing))
    with running_daemon(tree, *extra):
        assert raw_call(tree.socket, query("work", "vault", "test.Ask")) == b"result=deny\n"
    (record,) = tree.audit_records()
    assert "could not ask dom0" in str(record["reason"])


def test_queued_prompter_sees_the_spec_prompt(tree: PolicyTree) -> None:
    """In-process: the prompt the daemon builds, as a policy.Ask agent would receive it."""
    from qrexec.policy.decision.ask import QueuedPrompter
    from qrexec.policy.decision.audit import AuditLog
    from qrexec.policy.decision.decide import Decider
    from qrexec.policy.decision.wire import PolicyQuery
    from qrexec.policy.engine.system_info import JsonFileSystemInfo
    from qrexec.policy.loading.fs_loader import load_policy
    from qrexec.policy.loading.paths import PolicyPaths
    from qrexec.policy.loading.reload import ReloadingPolicy

    prompter = QueuedPrompter(["allow"])
    paths = PolicyPaths(policy_dirs=(str(tree.policy_dir),))
    decider = Decider(
        policy=ReloadingPolicy(lambda: load_policy(paths)),
        system_info=JsonFileSystemInfo(str(tree.system_info)),
        prompter=prompter,
        audit=AuditLog(None),
    )
    response = asyncio.run(decider.decide(PolicyQuery("work", "", "test.Ask+x"), channel="t"))
    assert response.target == "personal"
    ((prompt, guivm),) = prompter.prompts
    assert guivm == "dom0"
    assert json.loads(prompt.to_json()) == {
        "source": "work",
        "service": "test.Ask",
        "argument": "+x",
        "targets": ["@dispvm:dvm", "dvm", "personal", "sys-gui", "vault"],
        "default_target": "personal",
        "icons": {
            "work": "appvm-red",
            "personal": "appvm-yellow",
            "vault": "appvm-black",
        },
    }


def test_client_leaving_during_an_ask(tree: PolicyTree) -> None:
    """qrexec-daemon gives up (its caller went away) while the user is being asked: the
    decision is still made and audited once, and the daemon carries on."""

    tree.answers.write_text("test.Ask +slow * silent\n* * * allow\n")
    with running_daemon(tree, "--ask-timeout", "0.5"):
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(tree.socket))
            s.sendall(query("work", "vault", "test.Ask+slow"))
        answer = raw_call(tree.socket, query("work", "vault", "test.Ask"))
        assert answer.startswith(b"result=allow\n")
        for _ in range(200):  # the abandoned ask ends by its timeout
            if len(tree.audit_records()) == 2:
                break
            time.sleep(0.05)
    assert sorted(r["argument"] for r in tree.audit_records()) == ["+", "+slow"]
