"""ask: candidate lists (bottom-up scan, deny removes), default_target, answering an ask."""

from __future__ import annotations

import pytest

from qrexec.policy.engine.evaluation import resolve_ask, resolve_ask_assume_yes
from qrexec.policy.engine.model import Action
from tests.policy.policy_core_support import VM2_UUID, evaluate, outcome, system

ALL_FOR_VM1 = (
    "@dispvm:default-dvm",
    "@dispvm:other-dvm",
    "default-dvm",
    "disp12",
    "other-dvm",
    "tmpl",
    "vm2",
    "vm3",
)


@pytest.mark.parametrize(
    ("policy", "source", "target", "candidates"),
    [
        # @anyvm: every non-dom0 qube and disposable, minus the source and internal qubes
        ("test.Svc * vm1 @anyvm ask\n", "vm1", "@default", ALL_FOR_VM1),
        # * also offers dom0
        ("test.Svc * vm1 * ask\n", "vm1", "@default", tuple(sorted((*ALL_FOR_VM1, "dom0")))),
        # the rule's own target does not limit the list: every rule for the source counts
        ("test.Svc * vm1 vm2 ask\ntest.Svc * vm1 vm3 allow\n", "vm1", "vm2", ("vm2", "vm3")),
        # deny rules above remove their targets (bottom-up: earlier rules win)
        ("test.Svc * vm1 vm3 deny\ntest.Svc * vm1 @tag:tag1 ask\n", "vm1", "tmpl", ("tmpl",)),
        # ... but a deny *below* an allow does not remove what the allow added
        ("test.Svc * vm1 @tag:tag1 ask\ntest.Svc * vm1 vm3 deny\n", "vm1", "vm3", ("tmpl", "vm3")),
        # rules for other sources, services or arguments do not count
        (
            "test.Svc * vm1 vm2 ask\ntest.Svc * vm3 vm3 allow\ntest.X * vm1 tmpl allow\n"
            "test.Svc +x vm1 default-dvm allow\n",
            "vm1",
            "vm2",
            ("vm2",),
        ),
        # wildcard-service rules count
        ("test.Svc * vm1 vm2 ask\n* * @anyvm tmpl allow\n", "vm1", "vm2", ("tmpl", "vm2")),
        # redirected rules add their target= instead of the target column
        (
            "test.Svc * vm1 vm2 ask\ntest.Svc * vm1 @anyvm allow target=vm3\n",
            "vm1",
            "vm2",
            ("vm2", "vm3"),
        ),
        (
            "test.Svc * vm1 @default ask\ntest.Svc * vm1 @default allow target=@dispvm\n",
            "vm1",
            "@default",
            ("@dispvm:default-dvm",),
        ),
        # @dispvm expands to the source's default disposable; @dispvm:@tag:T to tagged bases
        ("test.Svc * @anyvm @dispvm ask\n", "vm2", "@dispvm", ("@dispvm:other-dvm",)),
        ("test.Svc * vm1 @dispvm:@tag:dvm-tag ask\n", "vm1", "@dispvm", ("@dispvm:default-dvm",)),
        (
            "test.Svc * vm1 @dispvm:other-dvm ask\n",
            "vm1",
            "@dispvm:other-dvm",
            ("@dispvm:other-dvm",),
        ),
        # @adminvm becomes dom0, uuid tokens become names, @type: and @tag: expand
        ("test.Svc * vm1 @adminvm ask\n", "vm1", "dom0", ("dom0",)),
        (f"test.Svc * vm1 uuid:{VM2_UUID} ask\n", "vm1", "vm2", ("vm2",)),
        ("test.Svc * vm1 @type:TemplateVM ask\n", "vm1", "tmpl", ("tmpl",)),
        (
            "test.Svc * vm1 @tag:tag1 ask\n",
            "vm1",
            "vm3",
            ("tmpl", "vm3"),
        ),  # not vm1, not sys-hidden
        # nonexistent names are not offered
        ("test.Svc * vm1 vm2 ask\ntest.Svc * vm1 ghost allow\n", "vm1", "vm2", ("vm2",)),
    ],
)
def test_candidates(policy: str, source: str, target: str, candidates: tuple[str, ...]) -> None:
    res = evaluate(policy, source, target)
    assert res.action is Action.ASK, res.reason
    assert res.targets_for_ask == candidates
    assert res.target is None


def test_ask_with_target_offers_only_that_target() -> None:
    res = evaluate("test.Svc * vm1 @anyvm ask target=@dispvm\n", "vm1", "vm2")
    assert res.targets_for_ask == ("@dispvm:default-dvm",)


def test_empty_candidate_list_denies() -> None:
    res = evaluate("test.Svc * vm1 @adminvm deny\ntest.Svc * vm1 * ask target=vm1\n", "vm1", "vm2")
    assert res.action is Action.DENY and "no target is available" in res.reason
    res = evaluate("test.Svc * vm1 @tag:nobody ask\n", "vm1", "@default")
    assert res.action is Action.DENY


def test_default_target_kept_only_when_offered() -> None:
    res = evaluate("test.Svc * vm1 @anyvm ask default_target=vm2\n", "vm1", "@default")
    assert res.default_target == "vm2"
    res = evaluate("test.Svc * vm1 @anyvm ask default_target=@dispvm\n", "vm1", "@default")
    assert res.default_target == "@dispvm:default-dvm"
    res = evaluate("test.Svc * vm1 vm2 ask default_target=vm3\n", "vm1", "vm2")
    assert res.action is Action.ASK and res.default_target is None
    res = evaluate("test.Svc * vm1 @tag:tag1 ask default_target=sys-hidden\n", "vm1", "@default")
    assert res.default_target is None


def test_answer_to_an_ask() -> None:
    info = system()
    res = evaluate("test.Svc * vm1 @anyvm ask user=u notify=yes\n", "vm1", "@default")
    allowed = resolve_ask(res, "vm3", info)
    assert outcome(allowed) == ("allow", "vm3")
    assert (allowed.user, allowed.notify, allowed.rule) == ("u", True, res.rule)
    assert outcome(resolve_ask(res, "@dispvm:other-dvm", info)) == ("allow", "@dispvm:other-dvm")
    refused = resolve_ask(res, "dom0", info)  # not offered
    assert refused.action is Action.DENY and "not one of the offered" in refused.reason
    with pytest.raises(ValueError, match="ask resolution"):
        resolve_ask(allowed, "vm3", info)


def test_answer_respects_autostart_no() -> None:
    info = system()
    res = evaluate("test.Svc * vm1 @anyvm ask autostart=no\n", "vm1", "@default")
    assert outcome(resolve_ask(res, "vm3", info)) == ("allow", "vm3")  # running
    assert resolve_ask(res, "vm2", info).action is Action.DENY  # halted


def test_assume_yes_uses_requested_then_default_target() -> None:
    info = system()
    policy = "test.Svc * vm1 @anyvm ask default_target=vm3\n"
    assert outcome(resolve_ask_assume_yes(evaluate(policy, "vm1", "vm2"), info)) == ("allow", "vm2")
    assert outcome(resolve_ask_assume_yes(evaluate(policy, "vm1", "@default"), info)) == (
        "allow",
        "vm3",
    )
    assert outcome(resolve_ask_assume_yes(evaluate(policy, "vm1", "@dispvm"), info)) == (
        "allow",
        "@dispvm:default-dvm",
    )
    no_default = evaluate("test.Svc * vm1 @anyvm ask\n", "vm1", "@default")
    assert resolve_ask_assume_yes(no_default, info).action is Action.DENY
