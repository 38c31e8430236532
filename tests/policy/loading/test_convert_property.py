"""Property: the converter's *text* output, parsed by the modern parser, decides every request
exactly as the legacy files it came from (R4.0 through !compat-4.0, 2011 on its own)."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from qrexec.policy.engine.model import Request, Resolution
from qrexec.policy.engine.policy import Policy
from qrexec.policy.engine.system_info import SystemInfo, parse_system_info
from qrexec.policy.loading.legacy_convert import convert_dir
from qrexec.policy.loading.memory_store import MemoryStore, load_policy_from_files, policy_from_text
from qrexec.policy.loading.paths import PolicyPaths

R40 = "/etc/qubes-rpc/policy"
OLD = "/etc/qubes_rpc/policy"
ETC = "/etc/qubes/policy.d"
NAMES = ["vm-a", "vm-b", "vm-c", "dvm1", "dvm2"]
SERVICES = ["test.A", "test.B"]
TAGS = ["t1", "t2"]


@st.composite
def system_infos(draw: st.DrawFn) -> SystemInfo:
    dom0_tags = sorted(draw(st.sets(st.sampled_from(TAGS))))
    domains: dict[str, Any] = {"dom0": {"type": "AdminVM", "tags": dom0_tags}}
    for name in NAMES:
        domains[name] = {
            "type": draw(st.sampled_from(["AppVM", "TemplateVM", "StandaloneVM", "DispVM"])),
            "tags": sorted(draw(st.sets(st.sampled_from(TAGS)))),
            "template_for_dispvms": draw(st.booleans()),
            "default_dispvm": draw(st.sampled_from([None, "dvm1", "dvm2"])),
            "power_state": draw(st.sampled_from(["Running", "Halted"])),
            "internal": draw(st.sampled_from([False, False, False, True])),
            "template": draw(st.sampled_from([None, "dvm1"])),
        }
    return parse_system_info({"domains": domains})


R40_SOURCES = [
    *NAMES,
    "$anyvm",
    "$adminvm",
    "dom0",
    "$tag:t1",
    "$type:AppVM",
    "$dispvm:dvm1",
    "$dispvm:$tag:t1",
    "$type:DispVM",
]
R40_TARGETS = [
    *NAMES,
    "$anyvm",
    "$adminvm",
    "dom0",
    "$default",
    "$dispvm",
    "$dispvm:dvm1",
    "$dispvm:$tag:t2",
    "$tag:t2",
    "$type:TemplateVM",
    "$type:AdminVM",
]
R40_REDIRECTS = [
    "vm-a",
    "vm-b",
    "dvm1",
    "$adminvm",
    "dom0",
    "$dispvm",
    "$dispvm:dvm1",
    "$dispvm:dvm2",
]


@st.composite
def r40_lines(draw: st.DrawFn) -> str:
    source = draw(st.sampled_from(R40_SOURCES))
    target = draw(st.sampled_from(R40_TARGETS))
    action = draw(st.sampled_from(["allow", "deny", "ask"]))
    options = []
    if action != "deny":
        if draw(st.booleans()) or (action == "allow" and target == "$default"):
            options.append("target=" + draw(st.sampled_from(R40_REDIRECTS)))
        if draw(st.booleans()):
            options.append("user=" + draw(st.sampled_from(["root", "user"])))
        if action == "ask" and draw(st.booleans()):
            options.append("default_target=" + draw(st.sampled_from(R40_REDIRECTS)))
    return f"{source} {target} " + ",".join([action, *options])


OLD_SOURCES = [*NAMES, "anyvm", "dom0", "dispvm"]
OLD_TARGETS = [*NAMES, "anyvm", "dom0", "dispvm"]
OLD_REDIRECTS = ["vm-a", "vm-c", "dvm2", "dom0", "dispvm"]


@st.composite
def old_lines(draw: st.DrawFn) -> str:
    action = draw(st.sampled_from(["allow", "deny", "ask"]))
    options = []
    if action != "deny":
        if draw(st.booleans()):
            options.append("user=" + draw(st.sampled_from(["root", "user"])))
        if draw(st.booleans()):
            options.append("target=" + draw(st.sampled_from(OLD_REDIRECTS)))
        options = draw(st.permutations(options))
    source = draw(st.sampled_from(OLD_SOURCES))
    target = draw(st.sampled_from(OLD_TARGETS))
    return f"{source} {target} " + ",".join([action, *options])


def file_names() -> st.SearchStrategy[str]:
    return st.builds(lambda s, a: s + a, st.sampled_from(SERVICES), st.sampled_from(["", "+x"]))


def legacy_dirs(lines: st.SearchStrategy[str]) -> st.SearchStrategy[dict[str, list[str]]]:
    return st.dictionaries(file_names(), st.lists(lines, min_size=1, max_size=6), max_size=3)


REQUEST_TARGETS = [
    *NAMES,
    "dom0",
    "@adminvm",
    "@default",
    "",
    "@dispvm",
    "@dispvm:dvm1",
    "@dispvm:dvm2",
    "ghost",
    "uuid:00000000-0000-0000-0000-000000000000",
]
# Requests are not sampled but enumerated (every service, argument, source and target), so a
# difference shows up whenever the random policy and system make one possible.
ALL_REQUESTS = [
    Request(service, argument, source, target)
    for service in [*SERVICES, "test.C"]
    for argument in ["+", "+x", "+y"]
    for source in [*NAMES, "dom0"]
    for target in REQUEST_TARGETS
]


def decision(res: Resolution) -> tuple[object, ...]:
    return (res.action, res.target, res.user, res.notify, res.targets_for_ask, res.default_target)


def converted_policy(files: dict[str, str], fmt: str, directory: str) -> tuple[Policy, str]:
    text = convert_dir(MemoryStore(files), fmt, directory)
    policy = policy_from_text(text)
    assert policy.error is None, (policy.error, text)
    return policy, text


def check_same(
    original: Policy, converted: Policy, text: str, info: SystemInfo, reqs: list[Request]
) -> None:
    lines = text.splitlines()
    for req in reqs:
        before, after = original.evaluate(req, info), converted.evaluate(req, info)
        assert decision(before) == decision(after), (req, before, after)
        assert (before.rule is None) == (after.rule is None)
        if before.rule is not None and after.rule is not None and before.rule.lineno:
            # the converted rule is announced by a comment naming the legacy file and line
            comment = lines[after.rule.lineno - 2]
            if "implicit" in before.rule.text:
                assert comment.startswith("# implicit deny closing ")
            else:
                assert comment.startswith(f"# {before.rule.path}:{before.rule.lineno}: ")


SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(legacy_dirs(r40_lines()), system_infos())
def test_r40_conversion_keeps_every_decision(spec: dict[str, list[str]], info: SystemInfo) -> None:
    files = {f"{R40}/{name}": "\n".join(lines) + "\n" for name, lines in spec.items()}
    original = load_policy_from_files(
        {**files, f"{ETC}/35-compat.policy": "!compat-4.0\n"}, PolicyPaths(policy_dirs=(ETC,))
    )
    assume(original.error is None)
    converted, text = converted_policy(files, "r4.0", R40)
    check_same(original, converted, text, info, ALL_REQUESTS)


@SETTINGS
@given(legacy_dirs(old_lines()), system_infos())
def test_2011_conversion_keeps_every_decision(spec: dict[str, list[str]], info: SystemInfo) -> None:
    files = {f"{OLD}/{name}": "\n".join(lines) + "\n" for name, lines in spec.items()}
    original = load_policy_from_files(files, PolicyPaths(), dirs=(OLD,))  # 2011-only system
    assert original.error is None
    converted, text = converted_policy(files, "2011", OLD)
    check_same(original, converted, text, info, ALL_REQUESTS)
