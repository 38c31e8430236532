"""qrexec-policy-daemon against a client written from spec §6.1 alone."""

from __future__ import annotations

import concurrent.futures
import socket
from pathlib import Path

import pytest

from tests.policy.policy_daemon_harness import (
    UUIDS,
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


def test_allow_deny_and_target_shapes(tree: PolicyTree) -> None:
    with running_daemon(tree):
        vm = raw_call(
            tree.socket,
            b"source=work\nrequested_source=\nintended_target=personal\n"
            b"service_and_arg=test.Allow+arg\n\n",
        )
        assert vm == (
            b"result=allow\nuser=DEFAULT\ntarget=personal\n"
            b"target_uuid=uuid:" + UUIDS["personal"].encode() + b"\n"
            b"autostart=True\nrequested_target=personal\n"
        )
        dom0 = answer_fields(raw_call(tree.socket, query("work", "@adminvm", "test.Allow")))
        assert dom0 == {
            "result": "allow",
            "user": "root",
            "target": "dom0",
            "autostart": "True",
            "requested_target": "@adminvm",
        }
        disp = answer_fields(raw_call(tree.socket, query("work", "@dispvm", "test.Disp+")))
        assert disp["target"] == "@dispvm:dvm"
        assert disp["target_uuid"] == "@dispvm:uuid:" + UUIDS["dvm"]
        redirect = answer_fields(raw_call(tree.socket, query("work", "personal", "test.Redirect")))
        assert (redirect["target"], redirect["requested_target"]) == ("vault", "personal")
        default = answer_fields(raw_call(tree.socket, query("work", "", "test.Redirect")))
        assert default["requested_target"] == "@default"
        assert raw_call(tree.socket, query("work", "personal", "test.Deny")) == b"result=deny\n"
        assert raw_call(tree.socket, query("work", "personal", "no.Rule")) == b"result=deny\n"
        assert raw_call(tree.socket, query("nobody", "work", "test.Allow")) == b"result=deny\n"
        # Loopback is refused by the engine.
        assert raw_call(tree.socket, query("work", "work", "test.Notify")) == b"result=deny\n"


def test_requested_source_must_be_a_remote_vm_relayed_by_the_caller(tree: PolicyTree) -> None:
    with running_daemon(tree):
        relayed = query("work", "personal", "test.Allow", "requested_source=vault")
        assert raw_call(tree.socket, relayed) == b"result=deny\n"
    assert "may not call on behalf of vault" in str(tree.audit_records()[-1]["reason"])


MALFORMED = [
    pytest.param(query("work", "personal", "test.Allow", "domain_id=3"), id="unknown-key"),
    pytest.param(
        b"source=work\nsource=work\nintended_target=personal\nservice_and_arg=test.Allow\n\n",
        id="duplicate-key",
    ),
    pytest.param(b"source=work\nservice_and_arg=test.Allow\n\n", id="missing-key"),
    pytest.param(b"\x89PNG\r\n\x1a\n\x00\x00garbage\n\n", id="garbage"),
    pytest.param(b"source=wo\x00rk\nintended_target=a\nservice_and_arg=b\n\n", id="nul"),
    pytest.param(b"x" * 200_000, id="oversize"),
    pytest.param(b"source=work\nintended_target=personal\n", id="closes-early"),
    pytest.param(b"", id="closes-at-once"),
    pytest.param(query("work", "personal", "test.Allow", "just_evaluate=perhaps"), id="bad-bool"),
]


@pytest.mark.parametrize("data", MALFORMED)
def test_malformed_requests_get_a_clean_error(
    tree: PolicyTree, data: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    with running_daemon(tree):
        try:
            reply = raw_call(tree.socket, data, half_close=True)
        except (BrokenPipeError, ConnectionResetError):
            reply = b""  # the daemon may close while an oversize request is still being sent
        assert reply == b""
        # ... and it keeps serving.
        ok = raw_call(tree.socket, query("work", "personal", "test.Allow"))
        assert ok.startswith(b"result=allow\n")
    assert any("malformed policy query" in r.getMessage() for r in caplog.records)
    # A refused query is not a decision: only the good one is in the audit log.
    assert [r["service"] for r in tree.audit_records()] == ["test.Allow"]


def test_many_concurrent_requests(tree: PolicyTree) -> None:
    requests = [
        (query("work", "personal", "test.Allow"), b"result=allow\n"),
        (query("work", "personal", "test.Deny"), b"result=deny\n"),
        (query("work", "@dispvm", "test.Disp"), b"result=allow\n"),
    ] * 40
    # A client that connects and never sends anything does not block the others.
    with (
        running_daemon(tree),
        concurrent.futures.ThreadPoolExecutor(16) as pool,
        socket.socket(socket.AF_UNIX) as idle,
    ):
        idle.connect(str(tree.socket))
        replies = list(pool.map(lambda r: raw_call(tree.socket, r[0]), requests))
    for (_, prefix), reply in zip(requests, replies, strict=True):
        assert reply.startswith(prefix)
    assert len(tree.audit_records()) == len(requests)


def test_just_evaluate_and_assume_yes(tree: PolicyTree) -> None:
    with running_daemon(tree):
        just = answer_fields(
            raw_call(tree.socket, query("work", "vault", "test.Ask", "just_evaluate=yes"))
        )
        assert (just["result"], just["target"]) == ("allow", "vault")
        yes = answer_fields(
            raw_call(tree.socket, query("work", "", "test.Ask", "assume_yes_for_ask=yes"))
        )
        assert (yes["result"], yes["target"]) == ("allow", "personal")
        # Nobody is asked: the scripted prompter would have said no.
        no_default = raw_call(tree.socket, query("work", "", "test.AskNoDefault"))
        assert no_default == b"result=deny\n"
    records = tree.audit_records()
    assert [r["result"] for r in records] == ["ask-allowed", "ask-allowed", "ask-denied"]
    assert records[0]["just_evaluate"] is True
    assert records[1]["assumed_yes"] is True


def test_socket_mode(tree: PolicyTree) -> None:
    with running_daemon(tree):
        for path in (tree.socket, tree.eval_socket, tree.gui_socket):
            assert (path.stat().st_mode & 0o777) == 0o660
    assert not tree.socket.exists()


def test_disabled_eval_sockets(tree: PolicyTree) -> None:
    with running_daemon(tree, "--eval-socket-path", "", "--gui-socket-path", ""):
        assert tree.socket.exists()
        assert not tree.eval_socket.exists() and not tree.gui_socket.exists()
