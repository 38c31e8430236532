"""policy.EvalSimple and policy.EvalGUI socket services (spec §6.4) of the policy daemon."""

from __future__ import annotations

from pathlib import Path

import pytest

from qrexec.errors import RemoteProtocolError
from qrexec.policy.decision.eval_services import parse_eval_body
from tests.policy.policy_daemon_harness import PolicyTree, raw_call, running_daemon

pytestmark = pytest.mark.timeout(120)


def call(path: Path, descriptor: bytes, body: bytes) -> bytes:
    return raw_call(path, descriptor + b"\0" + body, half_close=True)


def test_eval_simple(tmp_path: Path) -> None:
    tree = PolicyTree(tmp_path)
    tree.answers.write_text("* * * deny\n")  # must not be consulted: ask counts as yes
    with running_daemon(tree):
        dom0_form = b"policy.EvalSimple+test.Allow vault name dom0"
        assert call(tree.eval_socket, dom0_form, b"work\0personal") == b"result=allow"
        assert call(tree.eval_socket, dom0_form, b"work\0vault") == b"result=deny"
        vm_form = b"policy.EvalSimple+test.Ask vault"
        assert call(tree.eval_socket, vm_form, b"work\0vault") == b"result=allow"
        assert call(tree.eval_socket, vm_form, b"work\0@default") == b"result=allow"
        with_arg = b"policy.EvalSimple+test.Deny+some-arg vault keyword adminvm"
        assert call(tree.eval_socket, with_arg, b"work\0personal") == b"result=deny"
    records = tree.audit_records()
    assert {r["channel"] for r in records} == {"policy.EvalSimple"}
    assert all(r["just_evaluate"] is True for r in records)
    assert records[-1]["argument"] == "+some-arg"
    assert len(records) == 5


@pytest.mark.parametrize(
    "data",
    [
        b"policy.EvalSimple+test.Allow vault\0work",  # no NUL between source and target
        b"policy.EvalSimple+test.Allow vault\0\0personal",  # empty source
        b"policy.EvalSimple+test.Allow vault\0work\0",  # empty target
        b"policy.EvalSimple+test.Allow vault\0" + b"w" * 32 + b"\0personal",  # source > 31
        b"policy.EvalSimple+test.Allow vault\0work\0" + b"p" * 64,  # target > 63
        b"policy.EvalSimple+test.Allow vault\0work\0per sonal",
        b"policy.EvalSimple vault\0work\0personal",  # no service to evaluate
        b"policy.EvalGUI+test.Allow vault\0work\0personal",  # wrong service on this socket
        b"policy.EvalSimple+test.Allow",  # descriptor never ends
        b"\0work\0personal",
    ],
)
def test_eval_simple_malformed(tmp_path: Path, data: bytes) -> None:
    tree = PolicyTree(tmp_path)
    with running_daemon(tree):
        assert raw_call(tree.eval_socket, data, half_close=True) == b""
        good = call(tree.eval_socket, b"policy.EvalSimple+test.Allow vault", b"work\0personal")
        assert good == b"result=allow"


def test_eval_gui_needs_the_guivm_of_both(tmp_path: Path) -> None:
    """work has tag guivm-sys-gui, personal has guivm=sys-gui, vault neither."""
    tree = PolicyTree(tmp_path)
    tree.write_policy(
        "test.Allow * work personal allow\ntest.Allow * work vault allow\n"
        "test.Ask * work @anyvm ask\n"
    )
    with running_daemon(tree):
        gui = b"policy.EvalGUI+test.Allow sys-gui name dom0"
        assert call(tree.gui_socket, gui, b"work\0personal") == b"result=allow"
        assert call(tree.gui_socket, gui, b"work\0vault") == b"result=deny"
        ask = b"policy.EvalGUI+test.Ask sys-gui name dom0"
        assert call(tree.gui_socket, ask, b"work\0personal") == b"result=allow"
        other = b"policy.EvalGUI+test.Allow vault name dom0"
        assert call(tree.gui_socket, other, b"work\0personal") == b"result=deny"
        # The same question on EvalSimple does not check the caller.
        simple = b"policy.EvalSimple+test.Allow vault name dom0"
        assert call(tree.eval_socket, simple, b"work\0vault") == b"result=allow"
    reasons = [str(r["reason"]) for r in tree.audit_records() if r["channel"] == "policy.EvalGUI"]
    assert sum("is not the GuiVM" in r for r in reasons) == 2


def test_parse_eval_body() -> None:
    assert parse_eval_body(b"a\0b") == ("a", "b")
    assert parse_eval_body(b"w" * 31 + b"\0" + b"t" * 63) == ("w" * 31, "t" * 63)
    for bad in (b"", b"a", b"a\0", b"\0b", b"a\0b\xff", b"x" * 97):
        with pytest.raises(RemoteProtocolError):
            parse_eval_body(bad)
