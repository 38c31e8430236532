"""Invariants of policy decisions over random policies, system infos and requests (issue 13).

Whatever the policy says:
- a load never fails because of an unknown qube name or uuid, a malformed uuid, a name with
  characters qube names cannot have, or ``@dispvm:`` of dom0 (Qubes loads all of these);
- a request for an invalid intended target is denied before any rule;
- no ask offers a candidate that a matching ``deny`` excludes, one that is not running under
  ``autostart=no``, or ``@dispvm:X`` where X is not a disposable template;
- a rule whose source or target can never match a qube never decides;
- neither a decision nor answering an ask ever raises.

The oracles here are written independently of the engine's expansion code (membership tests
instead of enumerations). Derandomized, no deadline; the example count is what fits in about
20 s on the CI machine.
"""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qrexec.policy.engine.evaluation import resolve_ask
from qrexec.policy.engine.model import Action, Request
from qrexec.policy.engine.rules import Rule
from qrexec.policy.engine.system_info import DomainInfo, SystemInfo
from qrexec.policy.engine.tokens import matches_source, never_matches
from qrexec.policy.loading.memory_store import policy_from_text

DOM0_UUID = "00000000-0000-0000-0000-000000000000"
QUBES = ["work", "vault", "sys-net", "dvm", "dvm2", "disp1", "tmpl"]
TAGS = ["t1", "t2"]


def uuid_of(name: str) -> str:
    i = QUBES.index(name) + 1
    return f"{i:08x}-{i:04x}-{i:04x}-{i:04x}-{i:012x}"


#: Names and uuids: existing ones, unknown ones, and ones no qube can have.
NAME_TOKENS = [
    *QUBES,
    "ghost",
    "bad$name",
    "uuid:1234",
    "uuid:0",
    "1vm",
    "x" * 32,
    "-vm",
    "uuid:99999999-9999-9999-9999-999999999999",
    f"uuid:{uuid_of('work')}",
    f"uuid:{uuid_of('dvm').upper()}",
    f"uuid:{uuid_of('vault')}",
]
DISPVM_TOKENS = [
    *(f"@dispvm:{name}" for name in (*QUBES, "dom0", "ghost", "bad$name", "uuid:1234")),
    f"@dispvm:uuid:{DOM0_UUID}",
    f"@dispvm:uuid:{uuid_of('dvm')}",
]
KEYWORDS = [
    "*",
    "@anyvm",
    "@adminvm",
    "dom0",
    f"uuid:{DOM0_UUID}",
    "@dispvm:@tag:t1",
    *(f"@tag:{t}" for t in TAGS),
    "@type:AppVM",
    "@type:DispVM",
]
SOURCE_TOKENS = NAME_TOKENS + KEYWORDS + DISPVM_TOKENS
TARGET_TOKENS = [*SOURCE_TOKENS, "@default", "@dispvm"]
REDIRECT_TOKENS = [*NAME_TOKENS, "@adminvm", "dom0", "@dispvm", *DISPVM_TOKENS]
INVALID_REQUESTS = [
    "@anyvm",
    "*",
    "@tag:t1",
    "@type:AppVM",
    "@dispvm:@tag:t1",
    "@foo",
    "@dispvm:",
    "@dispvm:@anyvm",
]
REQUEST_TARGETS = [
    "",
    "@default",
    "@dispvm",
    "@adminvm",
    "dom0",
    f"uuid:{DOM0_UUID}",
    *NAME_TOKENS,
    *DISPVM_TOKENS,
    *INVALID_REQUESTS,
]

POWER_STATES = ["Running", "Paused", "Halted", "Transient"]
TYPES = ["AppVM", "AppVM", "TemplateVM", "StandaloneVM", "DispVM"]


def _pick(options: list[str | None] | list[str], bits: int) -> tuple[str | None, int]:
    return options[bits % len(options)], bits // len(options)


def domain_from_bits(name: str, bits: int) -> DomainInfo:
    """A qube whose properties are decoded from one integer: one draw per qube keeps data
    generation cheap, which is most of the cost of an example."""
    dom_type, bits = _pick(TYPES, bits)
    power_state, bits = _pick(POWER_STATES, bits)
    default_dispvm, bits = _pick([None, "dom0", "ghost", *QUBES], bits)
    template, bits = _pick(QUBES, bits)
    tags = frozenset(t for i, t in enumerate(TAGS) if bits >> i & 1)
    bits >>= len(TAGS)
    return DomainInfo(
        name=name,
        uuid=uuid_of(name) if bits & 1 else None,
        type=str(dom_type),
        tags=tags,
        default_dispvm=default_dispvm,
        template_for_dispvms=bool(bits & 2),
        power_state=str(power_state),
        internal=bits % 32 >= 28,  # one in eight
        template=template if dom_type == "DispVM" else None,
    )


@st.composite
def systems(draw: st.DrawFn) -> SystemInfo:
    names = draw(st.lists(st.sampled_from(QUBES), min_size=1, unique=True))
    doms = {name: domain_from_bits(name, draw(st.integers(0, 2**32))) for name in names}
    dom0_bits = draw(st.integers(0, 2**16))
    doms["dom0"] = DomainInfo(
        name="dom0",
        uuid=DOM0_UUID,
        type="AdminVM",
        power_state="Running",
        tags=frozenset(t for i, t in enumerate(TAGS) if dom0_bits >> i & 1),
        default_dispvm=[None, *QUBES][(dom0_bits >> 2) % (len(QUBES) + 1)],
    )
    return SystemInfo(doms)


@st.composite
def rule_lines(draw: st.DrawFn, source: str, target: str) -> str:
    """One rule line; about half name the request's source, target and service, so that
    rules decide (and asks collect candidates) often enough."""
    service = draw(st.sampled_from(["test.Svc", "test.Svc", "test.Svc", "*", "other.Svc"]))
    argument = "*" if service == "*" else draw(st.sampled_from(["*", "*", "*", "+", "+x"]))
    likely_sources = [source, "*", "@anyvm"]
    src = draw(st.sampled_from(likely_sources) | st.sampled_from(SOURCE_TOKENS))
    likely_targets = ["*", "@anyvm", "@default"]
    if target in TARGET_TOKENS:
        likely_targets.append(target)
    tgt = draw(st.sampled_from(likely_targets) | st.sampled_from(TARGET_TOKENS))
    action = draw(st.sampled_from(["ask", "ask", "ask", "allow", "allow", "deny"]))
    options: list[str] = []

    def maybe(key: str, values: list[str], chance: int = 2) -> None:
        if draw(st.integers(1, chance)) == 1:
            options.append(f"{key}={draw(st.sampled_from(values))}")

    if action != "deny":
        # Asks without target= scan every rule: the interesting case, so the common one.
        maybe("target", REDIRECT_TOKENS, 4 if action == "ask" else 2)
        if tgt == "@default" and action == "allow" and not options:
            options.append(f"target={draw(st.sampled_from(REDIRECT_TOKENS))}")
        if action == "ask":
            maybe("default_target", REDIRECT_TOKENS)
        maybe("autostart", ["yes", "no"])
    maybe("notify", ["yes", "no"])
    return " ".join([service, argument, src, tgt, action, *options])


@dataclasses.dataclass(frozen=True)
class Case:
    info: SystemInfo
    policy_text: str
    request: Request


@st.composite
def cases(draw: st.DrawFn) -> Case:
    info = draw(systems())
    names = sorted(info.names)
    source = draw(st.sampled_from(names))
    target = draw(st.sampled_from(["", "@dispvm", *names]) | st.sampled_from(REQUEST_TARGETS))
    lines = draw(st.lists(rule_lines(source, target), min_size=2, max_size=8))
    argument = draw(st.sampled_from(["+", "+x"]))
    return Case(info, "\n".join(lines) + "\n", Request("test.Svc", argument, source, target))


# --- independent oracles ---------------------------------------------------------------------


def is_invalid_request(text: str, info: SystemInfo) -> bool:
    """Qubes' "invalid intended target": a keyword no call can name, or ``@dispvm:X`` with X
    missing or not a disposable template. Unknown names and uuids are not invalid."""
    if text in ("", "@default", "@dispvm", "@adminvm"):
        return False
    if text.startswith("@dispvm:"):
        base = info.get(text[len("@dispvm:") :])
        return base is None or not base.template_for_dispvms
    return text == "*" or text.startswith("@")


def is_running(candidate: str, info: SystemInfo) -> bool:
    if candidate.startswith("@dispvm:"):
        return False
    dom = info.get(candidate)
    assert dom is not None, candidate
    return dom.type == "AdminVM" or dom.power_state == "Running"


def _qube(text: str, info: SystemInfo) -> DomainInfo | None:
    if text in ("dom0", "@adminvm"):
        return info.get("dom0")
    return info.get(text)


def stands_for(text: str, candidate: str, source: DomainInfo, info: SystemInfo) -> bool:
    """Does the rule token ``text`` stand for the ask candidate ``candidate``?"""
    if candidate.startswith("@dispvm:"):
        base = info.get(candidate[len("@dispvm:") :])
        assert base is not None
        if text in ("*", "@anyvm"):
            return True
        if text == "@dispvm":
            return base.name == source.default_dispvm
        if text.startswith("@dispvm:@tag:"):
            return text[len("@dispvm:@tag:") :] in base.tags
        if text.startswith("@dispvm:"):
            named = info.get(text[len("@dispvm:") :])
            return named is not None and named.name == base.name
        return False
    dom = info.get(candidate)
    assert dom is not None
    if text == "*":
        return True
    if text == "@anyvm":
        return dom.type != "AdminVM"
    if text.startswith("@tag:"):
        return text[len("@tag:") :] in dom.tags
    if text.startswith("@type:"):
        return text[len("@type:") :] == dom.type
    if text.startswith("@") and text != "@adminvm":
        return False
    named = _qube(text, info)
    return named is not None and named.name == dom.name


def what_rule_stands_for(rule: Rule, candidate: str, source: DomainInfo, info: SystemInfo) -> bool:
    if rule.redirect is not None:
        text = rule.redirect.text
        if text == "@dispvm":
            return source.default_dispvm is not None and (
                candidate == "@dispvm:" + source.default_dispvm
            )
        if text.startswith("@dispvm:"):
            named = info.get(text[len("@dispvm:") :])
            return named is not None and candidate == "@dispvm:" + named.name
        named = _qube(text, info)
        return named is not None and named.name == candidate
    return stands_for(rule.target.text, candidate, source, info)


def excluded_by_deny(
    rules: tuple[Rule, ...], request: Request, candidate: str, source: DomainInfo, info: SystemInfo
) -> bool:
    """Bottom-up semantics: the topmost rule for this call that stands for the candidate
    decides whether it is offered; a deny there excludes it."""
    for rule in rules:
        if not rule.matches_service(request.service, request.argument):
            continue
        if not matches_source(rule.source, source, info):
            continue
        if what_rule_stands_for(rule, candidate, source, info):
            return rule.action is Action.DENY
    return False


# --- the property ----------------------------------------------------------------------------

SETTINGS = settings(
    max_examples=3000,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# 3000 examples take about 20 s on an idle CI core; the timeout only guards a busy machine.
@pytest.mark.timeout(600)
@SETTINGS
@given(cases())
def test_decision_invariants(case: Case) -> None:
    info, request = case.info, case.request
    policy = policy_from_text(case.policy_text)
    assert policy.error is None, policy.error  # every generated token loads, as in Qubes
    res = policy.evaluate(request, info)  # never raises

    if is_invalid_request(request.target, info):
        assert res.action is Action.DENY and res.rule is None, res
        assert res.reason.startswith("invalid intended target"), res.reason
        return
    assert not res.reason.startswith("invalid intended target"), res.reason

    if res.rule is not None:
        rule = next(r for r in policy.rules if r.ref == res.rule)
        assert never_matches(rule.source) is None, (rule.ref.text, res)
        assert never_matches(rule.target) is None, (rule.ref.text, res)

    if res.action is not Action.ASK:
        return
    assert res.targets_for_ask, res
    rule = next(r for r in policy.rules if r.ref == res.rule)
    source = info.get(request.source)
    assert source is not None
    for candidate in res.targets_for_ask:
        assert candidate != source.name
        base = info.get(candidate.removeprefix("@dispvm:"))
        assert base is not None, candidate
        if candidate.startswith("@dispvm:"):
            assert base.template_for_dispvms, candidate
        if rule.redirect is None:
            # A scan never offers internal qubes (an explicit target= is offered as written).
            assert not base.internal, candidate
        if not rule.autostart:
            assert is_running(candidate, info), (candidate, res)
        if rule.redirect is None:
            assert not excluded_by_deny(policy.rules, request, candidate, source, info), (
                candidate,
                case.policy_text,
            )
        answered = resolve_ask(res, candidate, info)  # never raises
        assert answered.action in (Action.ALLOW, Action.DENY)
    if res.default_target is not None:
        assert res.default_target in res.targets_for_ask
