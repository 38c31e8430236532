"""Five classes of decisions where we used to disagree with Qubes R4.3's engine (issue 13).

Each table holds the minimal example of its class and its neighbours (name vs uuid forms,
``@adminvm`` vs ``dom0``, running vs paused vs halted, autostart and notify yes/no), so a
regression in either direction shows up. Qubes' behaviour is the reference throughout.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from qrexec.policy.decision.ask import QueuedPrompter
from qrexec.policy.decision.audit import AuditLog, read_audit_log
from qrexec.policy.decision.decide import Decider
from qrexec.policy.decision.notify import Notification
from qrexec.policy.decision.wire import PolicyQuery
from qrexec.policy.engine.model import Action, Request, Resolution
from qrexec.policy.engine.policy import Policy
from qrexec.policy.engine.system_info import StaticSystemInfo, SystemInfo, parse_system_info
from qrexec.policy.loading.memory_store import policy_from_text

DOM0_UUID = "00000000-0000-0000-0000-000000000000"
RUN_UUID = "11111111-1111-1111-1111-111111111111"
PLAIN_UUID = "22222222-2222-2222-2222-222222222222"
DVM_UUID = "33333333-3333-3333-3333-333333333333"

INFO: SystemInfo = parse_system_info(
    {
        "domains": {
            "dom0": {"type": "AdminVM", "uuid": DOM0_UUID, "power_state": "Running"},
            "work": {"power_state": "Running", "default_dispvm": "dvm", "tags": ["t"]},
            "run-vm": {"uuid": RUN_UUID, "power_state": "Running", "tags": ["t"]},
            "paused-vm": {"power_state": "Paused", "tags": ["t"]},
            "halted-vm": {"power_state": "Halted", "tags": ["t"]},
            # running, but not a disposable template
            "plain": {"uuid": PLAIN_UUID, "power_state": "Running"},
            "dvm": {"uuid": DVM_UUID, "template_for_dispvms": True, "tags": ["dt"]},
            "dvm-up": {"template_for_dispvms": True, "power_state": "Running", "tags": ["dt"]},
            "disp-run": {"type": "DispVM", "template": "dvm", "power_state": "Running"},
            "disp-paused": {"type": "DispVM", "template": "dvm", "power_state": "Paused"},
            "disp-halted": {"type": "DispVM", "template": "dvm", "power_state": "Halted"},
            # qubes whose default disposable template is not a disposable template
            "odd": {"power_state": "Running", "default_dispvm": "plain"},
            "odder": {"power_state": "Running", "default_dispvm": "dom0"},
            "disp-of-dom0": {"type": "DispVM", "template": "dom0", "power_state": "Running"},
        }
    }
)


def evaluate(policy: str | Policy, target: str, source: str = "work") -> Resolution:
    if isinstance(policy, str):
        policy = policy_from_text(policy)
        assert policy.error is None, policy.error
    return policy.evaluate(Request("test.Svc", "+", source, target), INFO)


def brief(res: Resolution) -> tuple[str, str | None]:
    return res.action.value, res.target


# --- 1. tokens Qubes accepts: they load and match nothing -------------------------------------

#: Load in every column (as names, or disposable bases, that no qube can have).
LOADS_AND_MATCHES_NOTHING = [
    "uuid:1234",
    "uuid:0",
    "uuid:",
    "uuid:zzzzzzzz-1111-1111-1111-111111111111",
    "bad$name",
    "1starts-with-digit",
    "-vm",
    "vm1,allow",
    "a" * 32,  # qube names have at most 31 characters
    "@dispvm:dom0",
    f"@dispvm:uuid:{DOM0_UUID}",
    f"@dispvm:uuid:{DOM0_UUID.upper()}",
    "@dispvm:bad$name",
    "@dispvm:uuid:1234",
]

#: Still errors, as in Qubes: unknown keywords and bad tags, types or disposable bases.
STILL_ERRORS = [
    "@foo",
    "@tag:",
    "@tag:a$b",
    "@type:",
    "@type:App-VM",
    "@dispvm:",
    "@dispvm:@anyvm",
    "@dispvm:@tag:",
]


@pytest.mark.parametrize("token", LOADS_AND_MATCHES_NOTHING)
def test_token_loads_in_every_column(token: str) -> None:
    columns = [f"test.Svc * {token} @anyvm deny", f"test.Svc * @anyvm {token} deny"]
    if not token.startswith("@"):
        columns += [
            f"test.Svc * @anyvm @anyvm allow target={token}",
            f"test.Svc * @anyvm @anyvm ask target={token} default_target={token}",
        ]
    else:  # @dispvm:X is also a valid redirect
        columns += [f"test.Svc * @anyvm @anyvm allow target={token}"]
    for line in columns:
        assert policy_from_text(line + "\n").error is None, line


_SOURCES = ["work", "dom0", "disp-run", "run-vm"]
_REQUESTS = ["", "@default", "halted-vm", "dom0", "@adminvm", "@dispvm", "@dispvm:dvm"]
#: (source, requested target) pairs that are not loopback calls (refused before any rule).
_CALLS = [
    (s, r) for s in _SOURCES for r in _REQUESTS if not (s == "dom0" and r in ("dom0", "@adminvm"))
]


@pytest.mark.parametrize("token", LOADS_AND_MATCHES_NOTHING)
@pytest.mark.parametrize(("source", "requested"), _CALLS)
def test_token_matches_nothing(token: str, source: str, requested: str) -> None:
    """As source or target the rule never decides; the fallback below it does."""
    fallback = "test.Svc * * * deny notify=no\n"
    for line in (f"test.Svc * {token} * allow", f"test.Svc * * {token} allow target=run-vm"):
        res = evaluate(line + "\n" + fallback, requested, source)
        assert res.action is Action.DENY
        assert res.rule is not None and res.rule.lineno == 2, (line, res.reason)


@pytest.mark.parametrize("token", STILL_ERRORS)
def test_bad_keywords_still_fail_the_policy(token: str) -> None:
    for line in (f"test.Svc * {token} @anyvm deny", f"test.Svc * @anyvm {token} deny"):
        policy = policy_from_text("test.Svc * @anyvm @anyvm allow\n" + line + "\n")
        assert policy.error is not None and policy.error.lineno == 2, line


@pytest.mark.parametrize(
    ("token", "requested", "matches"),
    [
        # a qube matches by name and by its uuid, in either case (Qubes compares uuid text)
        ("run-vm", "run-vm", True),
        (f"uuid:{RUN_UUID}", "run-vm", True),
        ("run-vm", f"uuid:{RUN_UUID}", True),
        (f"uuid:{RUN_UUID.upper()}", "run-vm", True),
        ("uuid:1111", "run-vm", False),
        # dom0, @adminvm and dom0's full uuid are one qube; short forms are names
        ("dom0", "@adminvm", True),
        ("@adminvm", "dom0", True),
        (f"uuid:{DOM0_UUID}", "@adminvm", True),
        ("@adminvm", f"uuid:{DOM0_UUID}", True),
        ("uuid:0", "dom0", False),
        ("uuid:0", "@adminvm", False),
        # a disposable template by name and by uuid
        ("@dispvm:dvm", "@dispvm:dvm", True),
        (f"@dispvm:uuid:{DVM_UUID}", "@dispvm:dvm", True),
        ("@dispvm:dvm", "@dispvm", True),  # work's default_dispvm is dvm
        ("@dispvm:dom0", "@dispvm", False),
        ("@dispvm:dom0", "@default", False),
    ],
)
def test_name_and_uuid_forms(token: str, requested: str, matches: bool) -> None:
    res = evaluate(f"test.Svc * work {token} allow\ntest.Svc * * * deny\n", requested)
    assert (res.rule is not None and res.rule.lineno == 1) is matches, res.reason


@pytest.mark.parametrize("token", ["@dispvm:dom0", f"@dispvm:uuid:{DOM0_UUID}"])
def test_dispvm_of_dom0_matches_nothing_even_if_data_says_so(token: str) -> None:
    """Even a default_dispvm (or a disposable's template) of dom0 does not make it match."""
    policy = f"test.Svc * {token} * allow\ntest.Svc * odder {token} allow\ntest.Svc * * * deny\n"
    for source, requested in (("odder", "@dispvm"), ("disp-of-dom0", "run-vm")):
        res = evaluate(policy, requested, source)
        assert res.rule is not None and res.rule.lineno == 3, res.reason


@pytest.mark.parametrize(
    ("redirect", "requested"),
    [("uuid:1234", "run-vm"), ("bad$name", "@default"), ("@dispvm:dom0", "@default")],
)
def test_redirect_to_a_token_that_names_nothing_is_denied(redirect: str, requested: str) -> None:
    allow = evaluate(f"test.Svc * work @anyvm allow target={redirect}\n", requested)
    ask = evaluate(f"test.Svc * work @anyvm ask target={redirect}\n", requested)
    assert allow.action is Action.DENY and allow.rule is not None
    assert ask.action is Action.DENY and ask.rule is not None


# --- 2. an invalid requested target is refused before any rule ---------------------------------

INVALID_REQUESTS = [
    "@anyvm",
    "*",
    "@tag:t",
    "@type:AppVM",
    "@dispvm:@tag:dt",
    "@foo",
    "@dispvm:",
    "@dispvm:plain",  # exists, not a disposable template
    f"@dispvm:uuid:{PLAIN_UUID}",
    "@dispvm:run-vm",
    "@dispvm:nonexistent",
    "@dispvm:uuid:99999999-9999-9999-9999-999999999999",
    "@dispvm:dom0",
    f"@dispvm:uuid:{DOM0_UUID}",
    "@dispvm:bad$name",
]

#: Neighbours that stay valid: unknown names and uuids mean @default, as in Qubes.
VALID_REQUESTS = [
    ("", "ask"),
    ("@default", "ask"),
    ("nonexistent", "ask"),
    ("uuid:1234", "ask"),
    ("bad$name", "ask"),
    ("uuid:99999999-9999-9999-9999-999999999999", "ask"),
    ("run-vm", "allow"),
    (f"uuid:{RUN_UUID}", "allow"),
    ("@dispvm:dvm", "allow"),
    (f"@dispvm:uuid:{DVM_UUID}", "allow"),
    ("@dispvm", "allow"),
    ("dom0", "allow"),
    ("@adminvm", "allow"),
]

PERMISSIVE = """\
test.Svc * @anyvm @default ask target=@dispvm
test.Svc * @anyvm * allow
* * * * allow target=run-vm
"""


@pytest.mark.parametrize("requested", INVALID_REQUESTS)
def test_invalid_requested_target_is_refused(requested: str) -> None:
    res = evaluate(PERMISSIVE, requested)
    assert res.action is Action.DENY
    assert res.rule is None
    assert res.reason.startswith("invalid intended target")


@pytest.mark.parametrize(("requested", "action"), VALID_REQUESTS)
def test_valid_requested_targets_still_evaluate(requested: str, action: str) -> None:
    assert evaluate(PERMISSIVE, requested).action.value == action


class _Policy:
    def __init__(self, policy: Policy) -> None:
        self.policy = policy

    def get_policy(self) -> Policy:
        return self.policy


class _Notifier:
    def __init__(self) -> None:
        self.sent: list[Notification] = []

    async def notify(self, notification: Notification, guivm: str) -> None:
        self.sent.append(notification)


def _decide(tmp_path: Path, policy: str, *queries: PolicyQuery) -> list[Notification]:
    notifier = _Notifier()
    decider = Decider(
        policy=_Policy(policy_from_text(policy)),
        system_info=StaticSystemInfo(INFO),
        prompter=QueuedPrompter(["allow:@dispvm:dvm"] * len(queries)),
        audit=AuditLog(str(tmp_path / "audit.jsonl")),
        notifier=notifier,
    )

    async def run() -> None:
        for query in queries:
            await decider.decide(query, channel="test")
        await decider.flush_notifications()

    asyncio.run(run())
    return notifier.sent


def test_invalid_target_reason_is_logged_and_audited(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="qrexec.policy")
    _decide(tmp_path, PERMISSIVE, PolicyQuery("work", "@anyvm", "test.Svc"))
    (record,) = read_audit_log(str(tmp_path / "audit.jsonl"))
    assert record["result"] == "deny" and record["rule"] is None
    assert record["requested_target"] == "@anyvm"
    assert "invalid intended target" in str(record["reason"])
    assert "'@anyvm' cannot be the target of a call" in str(record["reason"])
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("invalid intended target" in m and "@anyvm" in m for m in warnings), warnings


# --- 3. ask autostart=no offers only running qubes -------------------------------------------

RUNNING_FOR_WORK = ("disp-of-dom0", "disp-run", "dvm-up", "odd", "odder", "plain", "run-vm")
EVERYTHING_FOR_WORK = (
    "@dispvm:dvm",
    "@dispvm:dvm-up",
    "disp-halted",
    "disp-of-dom0",
    "disp-paused",
    "disp-run",
    "dvm",
    "dvm-up",
    "halted-vm",
    "odd",
    "odder",
    "paused-vm",
    "plain",
    "run-vm",
)

#: odd's default disposable template is plain, which is not one: no "@dispvm:plain".
EVERYTHING_FOR_ODD = tuple(sorted({*EVERYTHING_FOR_WORK, "work"} - {"odd"}))


@pytest.mark.parametrize(
    ("rule", "candidates", "requested"),
    [
        ("@anyvm ask autostart=no", RUNNING_FOR_WORK, "@default"),
        ("@anyvm ask autostart=yes", EVERYTHING_FOR_WORK, "@default"),
        ("@anyvm ask", EVERYTHING_FOR_WORK, "@default"),
        ("* ask autostart=no", (*RUNNING_FOR_WORK, "dom0"), "@default"),
        ("@tag:t ask autostart=no", ("run-vm",), "halted-vm"),
        ("@tag:t ask", ("halted-vm", "paused-vm", "run-vm"), "halted-vm"),
        ("@type:DispVM ask autostart=no", ("disp-of-dom0", "disp-run"), "disp-paused"),
        (
            "@type:DispVM ask",
            ("disp-halted", "disp-of-dom0", "disp-paused", "disp-run"),
            "disp-paused",
        ),
        # a new disposable never runs, even from a running template
        ("@dispvm:@tag:dt ask autostart=no", None, "@dispvm:dvm"),
        ("@dispvm:@tag:dt ask", ("@dispvm:dvm", "@dispvm:dvm-up"), "@dispvm:dvm"),
        # with target=: the one candidate must run
        ("@anyvm ask target=run-vm autostart=no", ("run-vm",), "@default"),
        ("@anyvm ask target=paused-vm autostart=no", None, "@default"),
        ("@anyvm ask target=halted-vm autostart=no", None, "@default"),
        ("@anyvm ask target=paused-vm", ("paused-vm",), "@default"),
        ("@anyvm ask target=@dispvm:dvm-up autostart=no", None, "@default"),
        ("@anyvm ask target=@dispvm autostart=no", None, "@default"),
        ("@anyvm ask target=@dispvm", ("@dispvm:dvm",), "@default"),
        ("@anyvm ask target=@adminvm autostart=no", ("dom0",), "@default"),
        ("@anyvm ask target=dom0 autostart=no", ("dom0",), "@default"),
        ("@anyvm ask target=disp-paused autostart=no", None, "@default"),
    ],
)
def test_ask_autostart_no_offers_only_running_qubes(
    rule: str, candidates: tuple[str, ...] | None, requested: str
) -> None:
    res = evaluate(f"test.Svc * work {rule}\n", requested)
    if candidates is None:
        assert res.action is Action.DENY and "no target is available" in res.reason
        assert res.rule is not None
    else:
        assert res.action is Action.ASK, res.reason
        assert res.targets_for_ask == tuple(sorted(candidates))


def test_ask_autostart_no_drops_a_default_target_that_is_not_running() -> None:
    up = evaluate("test.Svc * work @tag:t ask autostart=no default_target=run-vm\n", "halted-vm")
    down = evaluate(
        "test.Svc * work @tag:t ask autostart=no default_target=paused-vm\n", "halted-vm"
    )
    assert up.default_target == "run-vm"
    assert down.action is Action.ASK and down.default_target is None


# --- 4. the deny of allow ... autostart=no uses the rule's notify ----------------------------


@pytest.mark.parametrize(
    ("target", "options", "expected"),
    [
        ("run-vm", "autostart=no", ("allow", None)),
        ("paused-vm", "autostart=no", ("deny", False)),
        ("paused-vm", "autostart=no notify=yes", ("deny", True)),
        ("paused-vm", "autostart=no notify=no", ("deny", False)),
        ("halted-vm", "autostart=no", ("deny", False)),
        ("halted-vm", "autostart=no notify=yes", ("deny", True)),
        ("halted-vm", "autostart=yes", ("allow", None)),
        ("halted-vm", "", ("allow", None)),
        ("dom0", "autostart=no", ("allow", None)),
        ("@adminvm", "autostart=no", ("allow", None)),
        ("@dispvm:dvm-up", "autostart=no", ("deny", False)),
        ("@dispvm", "autostart=no notify=yes", ("deny", True)),
        ("disp-paused", "autostart=no", ("deny", False)),
        ("disp-run", "autostart=no", ("allow", None)),
        # other denies of an allow are not the rule's choice: still notified
        ("@dispvm:plain", "autostart=no notify=no", ("deny", True)),
        ("nonexistent", "autostart=no notify=no", ("deny", True)),
    ],
)
def test_allow_autostart_no_deny_uses_the_rules_notify(
    target: str, options: str, expected: tuple[str, bool | None]
) -> None:
    res = evaluate(f"test.Svc * work @anyvm allow target={target} {options}\n", "run-vm")
    action, notify = expected
    assert res.action.value == action, res.reason
    if res.action is Action.DENY:
        assert res.notify is notify
        assert res.rule is not None
    if target == "paused-vm" and res.action is Action.DENY:
        assert "autostart=no, and paused-vm is not running" in res.reason


def test_autostart_no_deny_notification_follows_the_rule(tmp_path: Path) -> None:
    sent = _decide(
        tmp_path,
        "test.Quiet * work @anyvm allow autostart=no\n"
        "test.Loud * work @anyvm allow autostart=no notify=yes\n",
        PolicyQuery("work", "halted-vm", "test.Quiet"),
        PolicyQuery("work", "halted-vm", "test.Loud"),
        PolicyQuery("work", "run-vm", "test.Quiet"),
    )
    assert [(n.resolution, n.service, n.target) for n in sent] == [
        ("deny", "test.Loud", "halted-vm")
    ]


# --- 5. @dispvm:X is offered only when X is a disposable template ----------------------------


@pytest.mark.parametrize(
    ("policy", "source", "requested", "candidates"),
    [
        # the minimal example: a redirect to @dispvm:X where X is not a disposable template
        (
            "test.Svc * work @default ask\ntest.Svc * work @anyvm allow target=@dispvm:plain\n",
            "work",
            "@default",
            None,
        ),
        (
            "test.Svc * work @default ask\n"
            f"test.Svc * work @anyvm allow target=@dispvm:uuid:{PLAIN_UUID}\n",
            "work",
            "@default",
            None,
        ),
        (
            "test.Svc * work @default ask\ntest.Svc * work @anyvm allow target=@dispvm:dvm\n",
            "work",
            "@default",
            ("@dispvm:dvm",),
        ),
        (
            "test.Svc * work @default ask\n"
            f"test.Svc * work @anyvm allow target=@dispvm:uuid:{DVM_UUID}\n",
            "work",
            "@default",
            ("@dispvm:dvm",),
        ),
        # @dispvm through a default_dispvm that is not a disposable template
        (
            "test.Svc * odd @default ask\ntest.Svc * odd @anyvm allow target=@dispvm\n",
            "odd",
            "@default",
            None,
        ),
        ("test.Svc * odd @dispvm ask\n", "odd", "@dispvm", None),
        ("test.Svc * work @dispvm ask\n", "work", "@dispvm", ("@dispvm:dvm",)),
        # @anyvm offers every disposable template and the source's default, if a template
        ("test.Svc * odd @anyvm ask\n", "odd", "@default", EVERYTHING_FOR_ODD),
        # @dispvm:plain matches odd's @dispvm, but stands for no disposable
        ("test.Svc * odd @dispvm:plain ask\n", "odd", "@dispvm", None),
        ("test.Svc * work @anyvm ask target=@dispvm:plain\n", "work", "@default", None),
    ],
)
def test_dispvm_candidates_need_a_disposable_template(
    policy: str, source: str, requested: str, candidates: tuple[str, ...] | None
) -> None:
    res = evaluate(policy, requested, source)
    if candidates is None:
        assert res.action is Action.DENY and "no target is available" in res.reason
    else:
        assert res.action is Action.ASK, res.reason
        assert res.targets_for_ask == candidates
