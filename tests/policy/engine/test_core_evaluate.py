"""Evaluation of §6.2: what each token matches, order, allow resolution and refusals."""

from __future__ import annotations

import pytest

from qrexec.policy.engine.model import Action, Request
from qrexec.policy.loading.memory_store import policy_from_text
from tests.policy.policy_core_support import (
    DOM0_UUID,
    VM1_UUID,
    VM2_UUID,
    evaluate,
    outcome,
    system,
)

# Source-column token → which callers it matches (among these sources).
SOURCES = ["dom0", "vm1", "vm2", "vm3", "tmpl", "disp12"]
SOURCE_MATCHES = [
    ("vm1", {"vm1"}),
    (f"uuid:{VM1_UUID}", {"vm1"}),
    ("*", set(SOURCES)),
    ("@anyvm", set(SOURCES) - {"dom0"}),
    ("@adminvm", {"dom0"}),
    ("dom0", {"dom0"}),
    (f"uuid:{DOM0_UUID}", {"dom0"}),
    ("@tag:tag1", {"vm1", "vm3", "tmpl"}),
    ("@tag:dom0-tag", {"dom0"}),
    ("@type:AppVM", {"vm1", "vm2", "vm3"}),
    ("@type:TemplateVM", {"tmpl"}),
    ("@type:AdminVM", {"dom0"}),
    ("@type:DispVM", {"disp12"}),
    ("@dispvm:default-dvm", {"disp12"}),
    ("@dispvm:other-dvm", set()),
    ("@dispvm:@tag:dvm-tag", {"disp12"}),
    ("@dispvm:@tag:tag2", set()),
]


@pytest.mark.parametrize(("token", "expected"), SOURCE_MATCHES)
def test_source_column_matches(token: str, expected: set[str]) -> None:
    policy = policy_from_text(f"test.Svc * {token} @anyvm allow target=default-dvm\n")
    matched = {s for s in SOURCES if evaluate(policy, s, "other-dvm").action is Action.ALLOW}
    assert matched == expected


# Target-column token → which requested targets it matches, requests made by vm1.
TARGETS = [
    "dom0",
    "@adminvm",
    "vm2",
    f"uuid:{VM2_UUID}",
    "tmpl",
    "@default",
    "@dispvm",
    "@dispvm:default-dvm",
    "@dispvm:other-dvm",
    "nonexistent",
]
TARGET_MATCHES = [
    ("vm2", {"vm2", f"uuid:{VM2_UUID}"}),
    (f"uuid:{VM2_UUID}", {"vm2", f"uuid:{VM2_UUID}"}),
    ("*", set(TARGETS)),
    ("@anyvm", set(TARGETS) - {"dom0", "@adminvm"}),
    ("@adminvm", {"dom0", "@adminvm"}),
    ("dom0", {"dom0", "@adminvm"}),
    ("@default", {"@default", "nonexistent"}),
    ("@dispvm", {"@dispvm"}),
    # vm1's default_dispvm is default-dvm, so a plain @dispvm request matches it too.
    ("@dispvm:default-dvm", {"@dispvm", "@dispvm:default-dvm"}),
    ("@dispvm:other-dvm", {"@dispvm:other-dvm"}),
    ("@dispvm:@tag:dvm-tag", {"@dispvm", "@dispvm:default-dvm"}),
    ("@tag:tag2", {"vm2", f"uuid:{VM2_UUID}"}),
    ("@tag:tag1", {"tmpl"}),
    ("@type:TemplateVM", {"tmpl"}),
    ("@type:AdminVM", {"dom0", "@adminvm"}),
]


@pytest.mark.parametrize(("token", "expected"), TARGET_MATCHES)
def test_target_column_matches(token: str, expected: set[str]) -> None:
    # deny (not allow) so that matching is observable even where allow would be refused.
    policy = policy_from_text(f"test.Svc * vm1 {token} deny\n")
    matched = {t for t in TARGETS if evaluate(policy, "vm1", t).rule is not None}
    assert matched == expected


@pytest.mark.parametrize(
    ("service", "argument", "rule", "matches"),
    [
        ("test.Svc", "+", "test.Svc * vm1 vm2 allow", True),
        ("test.Svc", "+x", "test.Svc * vm1 vm2 allow", True),
        ("test.Svc", "+", "test.Svc + vm1 vm2 allow", True),
        ("test.Svc", "+x", "test.Svc + vm1 vm2 allow", False),
        ("test.Svc", "+x", "test.Svc +x vm1 vm2 allow", True),
        ("test.Svc", "+xy", "test.Svc +x vm1 vm2 allow", False),
        ("test.Svc", "+", "test.Svc +x vm1 vm2 allow", False),
        ("test.Other", "+", "test.Svc * vm1 vm2 allow", False),
        ("test.Other", "+x", "* * vm1 vm2 allow", True),
    ],
)
def test_service_and_argument_columns(
    service: str, argument: str, rule: str, matches: bool
) -> None:
    res = evaluate(rule + "\n", "vm1", "vm2", service, argument)
    assert (res.action is Action.ALLOW) is matches


def test_first_match_wins_and_order_is_file_order() -> None:
    policy = policy_from_text(
        "test.Svc * vm1 vm2 deny notify=no\n"
        "test.Svc * @anyvm @anyvm allow\n"
        "* * @anyvm @anyvm deny\n"
    )
    res = evaluate(policy, "vm1", "vm2")
    assert res.action is Action.DENY and res.rule is not None and res.rule.lineno == 1
    assert res.notify is False
    assert evaluate(policy, "vm3", "vm2").rule.lineno == 2  # type: ignore[union-attr]
    assert evaluate(policy, "vm3", "vm2", "test.Other").rule.lineno == 3  # type: ignore[union-attr]


def test_wildcard_rules_keep_their_place_between_specific_ones() -> None:
    policy = policy_from_text(
        "test.A * vm1 vm2 deny\n* * vm1 vm2 allow\ntest.A * vm1 vm2 ask\ntest.B * vm1 vm3 allow\n"
    )
    assert evaluate(policy, "vm1", "vm2", "test.A").rule.lineno == 1  # type: ignore[union-attr]
    assert evaluate(policy, "vm1", "vm2", "test.B").rule.lineno == 2  # type: ignore[union-attr]
    assert evaluate(policy, "vm1", "vm3", "test.B").rule.lineno == 4  # type: ignore[union-attr]
    assert evaluate(policy, "vm1", "vm3", "test.A").rule is None


def test_no_match_denies_and_suggests_a_line() -> None:
    res = evaluate("test.Other * vm1 vm2 allow\n", "vm1", "vm2", "test.Add")
    assert res.action is Action.DENY and res.rule is None and res.notify
    assert res.reason == (
        "no rule matched; to allow, add `test.Add * vm1 vm2 allow` to "
        "/etc/qubes/policy.d/30-user.policy"
    )
    res = evaluate("", "vm1", "@default", "test.Add", "+x")
    assert "`test.Add +x vm1 @default allow target=QUBE`" in res.reason
    assert "`test.Add * vm1 @adminvm allow`" in evaluate("", "vm1", "dom0", "test.Add").reason


@pytest.mark.parametrize(
    ("rule", "source", "target", "expected"),
    [
        ("* * @anyvm @anyvm allow", "vm1", "vm2", ("allow", "vm2")),
        ("* * @anyvm @anyvm allow", "vm1", f"uuid:{VM2_UUID}", ("allow", "vm2")),
        ("* * @anyvm * allow", "vm1", "@adminvm", ("allow", "dom0")),
        ("* * @anyvm * allow", "vm1", f"uuid:{DOM0_UUID}", ("allow", "dom0")),
        ("* * @anyvm @adminvm allow", "vm1", "dom0", ("allow", "dom0")),
        # @dispvm becomes a disposable of the *source's* default_dispvm
        ("* * @anyvm @dispvm allow", "vm1", "@dispvm", ("allow", "@dispvm:default-dvm")),
        ("* * @anyvm @dispvm allow", "vm2", "@dispvm", ("allow", "@dispvm:other-dvm")),
        ("* * @anyvm @dispvm allow", "vm3", "@dispvm", ("deny", None)),  # no default_dispvm
        ("* * @anyvm @anyvm allow", "vm1", "@dispvm:other-dvm", ("allow", "@dispvm:other-dvm")),
        # redirection
        ("* * @anyvm @default allow target=vm2", "vm1", "@default", ("allow", "vm2")),
        ("* * @anyvm @anyvm allow target=@adminvm", "vm1", "vm2", ("allow", "dom0")),
        ("* * @anyvm @anyvm allow target=@dispvm", "vm1", "vm2", ("allow", "@dispvm:default-dvm")),
        (
            "* * @anyvm @anyvm allow target=@dispvm:other-dvm",
            "vm1",
            "vm2",
            ("allow", "@dispvm:other-dvm"),
        ),
        (f"* * @anyvm @anyvm allow target=uuid:{VM2_UUID}", "vm1", "vm3", ("allow", "vm2")),
        ("* * @anyvm @anyvm allow target=ghost", "vm1", "vm2", ("deny", None)),
        ("* * @anyvm @anyvm allow target=@dispvm:vm2", "vm1", "vm3", ("deny", None)),
        # allow resolving to @default is refused (nonexistent target → @default)
        ("* * @anyvm @anyvm allow", "vm1", "@default", ("deny", None)),
        ("* * @anyvm @anyvm allow", "vm1", "ghost", ("deny", None)),
        ("* * @anyvm * allow", "vm1", "", ("deny", None)),
        # loopback
        ("* * @anyvm @anyvm allow", "vm1", "vm1", ("deny", None)),
        ("* * @anyvm @anyvm allow target=vm1", "vm1", "vm2", ("deny", None)),
        # autostart=no: running ok, halted denied, dom0 always running, disposables never
        ("* * @anyvm @anyvm allow autostart=no", "vm1", "vm3", ("allow", "vm3")),
        ("* * @anyvm @anyvm allow autostart=no", "vm1", "vm2", ("deny", None)),
        ("* * @anyvm * allow autostart=no", "vm1", "dom0", ("allow", "dom0")),
        ("* * @anyvm @dispvm allow autostart=no", "vm1", "@dispvm", ("deny", None)),
        # unknown source
        ("* * * * allow", "ghost", "vm2", ("deny", None)),
    ],
)
def test_allow_resolution(
    rule: str, source: str, target: str, expected: tuple[str, str | None]
) -> None:
    assert outcome(evaluate(rule + "\n", source, target)) == expected


def test_allow_carries_rule_options_and_reason() -> None:
    res = evaluate(
        "x * vm1 vm2 ask\n* * vm1 vm2 allow user=root notify=yes autostart=yes\n", "vm1", "vm2"
    )
    assert (res.user, res.notify, res.autostart) == ("root", True, True)
    assert res.rule is not None and res.rule.lineno == 2
    assert res.rule.text == "* * vm1 vm2 allow user=root notify=yes autostart=yes"
    assert res.reason.startswith("allowed by /etc/qubes/policy.d/30-test.policy:2")


def test_loopback_refused_before_any_rule() -> None:
    for rule in ("* * vm1 vm1 allow", "* * vm1 @anyvm allow target=vm2", "* * vm1 vm1 ask"):
        res = evaluate(rule + "\n", "vm1", "vm1")
        assert res.action is Action.DENY and res.rule is None and "loopback" in res.reason
    res = evaluate("* * vm1 vm1 allow\n", "vm1", f"uuid:{VM1_UUID}")
    assert res.action is Action.DENY and "loopback" in res.reason


def test_refusal_reasons_name_the_cause() -> None:
    assert "loopback" in evaluate("* * @anyvm @anyvm allow\n", "vm1", "vm1").reason
    assert "not running" in evaluate("* * @anyvm @anyvm allow autostart=no\n", "vm1", "vm2").reason
    assert "no target" in evaluate("* * @anyvm @anyvm allow\n", "vm1", "@default").reason
    assert "default_dispvm" in evaluate("* * @anyvm @dispvm allow\n", "vm3", "@dispvm").reason


@pytest.mark.parametrize(
    ("service", "argument"), [("bad/name", "+"), ("test.Svc", "x"), ("test.Svc", "+a b"), ("", "+")]
)
def test_malformed_requests_are_denied_not_raised(service: str, argument: str) -> None:
    policy = policy_from_text("* * * * allow target=vm2\n")
    res = policy.evaluate(Request(service, argument, "vm1", "vm2"), system())
    assert res.action is Action.DENY and "invalid" in res.reason


def test_failed_policy_denies_everything_with_the_error() -> None:
    policy = policy_from_text("* * @anyvm @anyvm allow\nbroken line\n", "/p/10-a.policy")
    res = evaluate(policy, "vm1", "vm2")
    assert res.action is Action.DENY
    assert res.reason.startswith("policy failed to load: /p/10-a.policy:2: ")
