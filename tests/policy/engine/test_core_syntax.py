"""Rule-line syntax of §6.2: service and argument columns, actions, options, comments."""

from __future__ import annotations

import pytest

from qrexec.policy.engine.model import Action
from qrexec.policy.loading.memory_store import policy_from_text

VALID = [
    "test.Svc * vm1 vm2 allow",
    "test.Svc + vm1 vm2 allow",
    "test.Svc +arg vm1 vm2 allow",
    "test.Svc +a.b-c_d+e vm1 vm2 allow",
    "* * vm1 vm2 allow",
    "qubes.Filecopy * @anyvm @anyvm ask",
    "test.Svc * vm1 vm2 deny notify=no",
    "test.Svc * vm1 vm2 deny notify=yes",
    "test.Svc * vm1 vm2 allow target=vm3 user=root autostart=no notify=yes",
    "test.Svc * vm1 @default allow target=vm3",
    "test.Svc * vm1 @default ask",
    "test.Svc * vm1 @default ask target=vm3 default_target=vm3 user=u autostart=yes notify=no",
    "  test.Svc\t*   vm1  vm2   allow  ",
]

INVALID = [
    ("test.Svc * vm1 vm2", "expected SERVICE"),
    ("test.Svc vm1 vm2 allow", "expected SERVICE"),
    ("* +arg vm1 vm2 allow", "* service requires a * argument"),
    ("* + vm1 vm2 allow", "* service requires a * argument"),
    ("test.Svc arg vm1 vm2 allow", "must start with +"),
    ("test.Svc +a/b vm1 vm2 allow", "invalid argument"),
    ("test+Svc * vm1 vm2 allow", "invalid service name"),
    ("test/Svc * vm1 vm2 allow", "invalid service name"),
    ("test.Svc * vm1 vm2 permit", "invalid action"),
    ("test.Svc * vm1 vm2 Allow", "invalid action"),
    ("test.Svc * vm1 vm2 allow,target=vm3", "invalid action"),
    ("test.Svc * vm1 vm2 deny target=vm3", "invalid option 'target' for deny"),
    ("test.Svc * vm1 vm2 deny user=root", "invalid option 'user' for deny"),
    ("test.Svc * vm1 vm2 allow default_target=vm3", "invalid option 'default_target'"),
    ("test.Svc * vm1 vm2 allow color=red", "invalid option 'color'"),
    ("test.Svc * vm1 vm2 allow target", "expected key=value"),
    ("test.Svc * vm1 vm2 allow =vm3", "expected key=value"),
    ("test.Svc * vm1 vm2 allow notify=true", "must be yes or no"),
    ("test.Svc * vm1 vm2 allow autostart=1", "must be yes or no"),
    ("test.Svc * vm1 vm2 deny notify=", "must be yes or no"),
    ("test.Svc * vm1 vm2 allow user=root user=root", "repeated option 'user'"),
    ("test.Svc * vm1 vm2 allow target=vm3 target=vm1", "repeated option 'target'"),
    ("test.Svc * vm1 vm2 allow user=a:b", "invalid user"),
    ("test.Svc * vm1 @default allow", "requires target="),
    ("test.Svc * vm1 vm2 allow # comment", "invalid option '#'"),
    ("!include", "takes 1 argument"),
    ("!include a b", "takes 1 argument"),
    ("!include-service test.Svc +x", "takes 3 argument"),
    ("!include-service * +x file", "* service requires"),
    ("!compat-4.0 extra", "takes 0 argument"),
    ("!unknown x", "unknown directive"),
]


@pytest.mark.parametrize("line", VALID)
def test_valid_rule_lines(line: str) -> None:
    policy = policy_from_text(f"# leading comment\n\n{line}\n   # indented comment\n")
    assert policy.error is None
    assert len(policy.rules) == 1
    assert policy.rules[0].ref.lineno == 3


@pytest.mark.parametrize(("line", "message"), INVALID)
def test_invalid_rule_lines(line: str, message: str) -> None:
    policy = policy_from_text(f"test.Other * @anyvm @anyvm allow\n{line}\n", "/x/50-a.policy")
    assert policy.error is not None
    assert policy.error.path == "/x/50-a.policy"
    assert policy.error.lineno == 2
    assert message in policy.error.reason


def test_defaults_of_each_action() -> None:
    policy = policy_from_text(
        "a * vm1 vm2 allow\nb * vm1 vm2 deny\nc * vm1 vm2 ask\n"
        "d * vm1 vm2 allow autostart=no notify=yes user=root\n"
    )
    allow, deny, ask, custom = policy.rules
    assert (allow.action, allow.autostart, allow.notify, allow.user) == (
        Action.ALLOW,
        True,
        False,
        None,
    )
    assert (deny.action, deny.notify) == (Action.DENY, True)
    assert (ask.action, ask.autostart, ask.notify) == (Action.ASK, True, False)
    assert (custom.autostart, custom.notify, custom.user) == (False, True, "root")


def test_rule_text_round_trip() -> None:
    text = "test.Svc +arg @tag:t @dispvm:@tag:d ask target=@dispvm default_target=@dispvm user=u\n"
    policy = policy_from_text(text)
    assert policy.rules[0].to_text() == text.strip()
    assert str(policy.rules[0].ref).endswith(":1")


def test_nul_byte_is_a_syntax_error() -> None:
    policy = policy_from_text("test.Svc * vm1 vm2 allow\0\n")
    assert policy.error is not None and "NUL" in policy.error.reason
