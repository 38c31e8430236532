"""The Decider in-process: relays (requested_source, RemoteVM targets), notifications,
failures turned into denies, exactly one audit record per decision."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from qrexec.errors import SystemInfoError
from qrexec.policy.decision.ask import QueuedPrompter
from qrexec.policy.decision.audit import AuditLog, read_audit_log
from qrexec.policy.decision.decide import Decider
from qrexec.policy.decision.notify import Notification
from qrexec.policy.decision.wire import PolicyQuery, PolicyResponse
from qrexec.policy.engine.policy import Policy
from qrexec.policy.engine.system_info import StaticSystemInfo, SystemInfo, parse_system_info
from qrexec.policy.loading.memory_store import policy_from_text

INFO = parse_system_info(
    {
        "domains": {
            "dom0": {"type": "AdminVM", "power_state": "Running"},
            "work": {"uuid": "11111111-1111-1111-1111-111111111111", "power_state": "Running"},
            "relay": {"uuid": "22222222-2222-2222-2222-222222222222", "power_state": "Running"},
            "far": {
                "uuid": "33333333-3333-3333-3333-333333333333",
                "type": "RemoteVM",
                "power_state": "Running",
                "relayvm": "relay",
                "transport_rpc": "qubesair.SSHProxy",
            },
            "gui-user": {"power_state": "Running", "guivm": "sys-gui"},
        }
    }
)

POLICY = """\
test.Call * work far allow
test.Call * far work allow
test.Loud * work @anyvm allow notify=yes
test.Ask * gui-user @anyvm ask
* * @anyvm @anyvm deny
"""


class StaticPolicy:
    def __init__(self, policy: Policy) -> None:
        self.policy = policy

    def get_policy(self) -> Policy:
        return self.policy


class RecordingNotifier:
    def __init__(self) -> None:
        self.sent: list[tuple[Notification, str]] = []

    async def notify(self, notification: Notification, guivm: str) -> None:
        self.sent.append((notification, guivm))


def make(
    tmp_path: Path, prompter: QueuedPrompter | None = None
) -> tuple[Decider, RecordingNotifier]:
    notifier = RecordingNotifier()
    decider = Decider(
        policy=StaticPolicy(policy_from_text(POLICY)),
        system_info=StaticSystemInfo(INFO),
        prompter=prompter or QueuedPrompter(),
        audit=AuditLog(str(tmp_path / "audit.jsonl")),
        notifier=notifier,
    )
    return decider, notifier


def decide_all(decider: Decider, *queries: PolicyQuery) -> list[PolicyResponse]:
    async def run() -> list[PolicyResponse]:
        out = [await decider.decide(q, channel="test") for q in queries]
        await decider.flush_notifications()
        return out

    return asyncio.run(run())


def test_remote_vm_target_goes_through_its_relay(tmp_path: Path) -> None:
    decider, _ = make(tmp_path)
    (resp,) = decide_all(decider, PolicyQuery("work", "far", "test.Call+x", ""))
    assert resp.encode() == (
        b"result=allow\nuser=DEFAULT\ntarget=relay\n"
        b"target_uuid=uuid:22222222-2222-2222-2222-222222222222\n"
        b"autostart=True\nrequested_target=far\nservice=qubesair.SSHProxy+far+test.Call+x\n"
    )


def test_relayed_source_is_evaluated_as_the_remote_qube(tmp_path: Path) -> None:
    decider, _ = make(tmp_path)
    relayed, impostor, unknown = decide_all(
        decider,
        PolicyQuery("relay", "work", "test.Call", "far"),
        PolicyQuery("work", "work", "test.Call", "far"),
        PolicyQuery("relay", "work", "test.Call", "nowhere"),
    )
    assert relayed.allowed and relayed.policy_source == "far" and relayed.target == "work"
    assert not impostor.allowed and not unknown.allowed
    records = read_audit_log(str(tmp_path / "audit.jsonl"))
    assert [r["requested_source"] for r in records] == ["far", "far", "nowhere"]
    assert "may not call on behalf of far" in str(records[1]["reason"])
    assert "unknown requested source" in str(records[2]["reason"])


def test_notifications_follow_the_rules(tmp_path: Path) -> None:
    decider, notifier = make(tmp_path, QueuedPrompter(["deny"]))
    decide_all(
        decider,
        PolicyQuery("work", "far", "test.Call"),  # allow, notify=no: silent
        PolicyQuery("work", "relay", "test.Loud"),  # allow, notify=yes
        PolicyQuery("work", "relay", "other.Service"),  # deny: notified
        PolicyQuery("gui-user", "work", "test.Ask"),  # user said no: silent
        PolicyQuery("work", "relay", "other.Service", just_evaluate=True),  # never notified
    )
    assert [(n.resolution, n.service, n.target, guivm) for n, guivm in notifier.sent] == [
        ("allow", "test.Loud", "relay", "dom0"),
        ("deny", "other.Service", "relay", "dom0"),
    ]


def test_ask_goes_to_the_sources_guivm(tmp_path: Path) -> None:
    prompter = QueuedPrompter(["allow:work"])
    decider, _ = make(tmp_path, prompter)
    (resp,) = decide_all(decider, PolicyQuery("gui-user", "", "test.Ask"))
    assert resp.target == "work"
    assert [guivm for _, guivm in prompter.prompts] == ["sys-gui"]


class BrokenPolicy:
    def get_policy(self) -> Policy:
        raise RuntimeError("bug in a loader")


class BrokenInfo:
    def get_system_info(self) -> SystemInfo:
        raise SystemInfoError("qubesd is away")


@pytest.mark.parametrize(
    ("policy", "info", "reason"),
    [
        (BrokenPolicy(), StaticSystemInfo(INFO), "internal error"),
        (StaticPolicy(policy_from_text(POLICY)), BrokenInfo(), "system info unavailable"),
    ],
)
def test_failures_are_denies_with_one_error_record(
    tmp_path: Path, policy: object, info: object, reason: str
) -> None:
    notifier = RecordingNotifier()
    decider = Decider(
        policy=policy,  # type: ignore[arg-type]
        system_info=info,  # type: ignore[arg-type]
        prompter=QueuedPrompter(),
        audit=AuditLog(str(tmp_path / "audit.jsonl")),
        notifier=notifier,
    )
    (resp,) = decide_all(decider, PolicyQuery("work", "far", "test.Call"))
    assert not resp.allowed
    (record,) = read_audit_log(str(tmp_path / "audit.jsonl"))
    assert record["result"] == "error" and reason in str(record["reason"])
    assert [(n.resolution, n.source, n.target, g) for n, g in notifier.sent] == [
        ("fail", "work", "far", "dom0")
    ]
