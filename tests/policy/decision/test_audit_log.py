"""The audit log: one JSON line per decision, with the fields an admin needs."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import pytest

from qrexec.policy.decision.audit import AuditLog, AuditRecord, read_audit_log
from tests.policy.policy_daemon_harness import UUIDS, PolicyTree, query, raw_call, running_daemon

pytestmark = pytest.mark.timeout(120)

FIELDS = {
    "time", "channel", "source", "requested_source", "requested_target", "target",
    "service", "argument", "result", "user", "rule", "reason",
}  # fmt: skip


def test_one_line_per_decision_with_rule_and_reason(tmp_path: Path) -> None:
    tree = PolicyTree(tmp_path)
    tree.answers.write_text("test.Ask +no * deny\n* * * allow\n")
    calls = [
        query("work", "personal", "test.Allow+x"),
        query("work", "@adminvm", "test.Allow"),
        query("work", "personal", "test.Deny"),
        query("work", "vault", "test.Ask"),
        query("work", "vault", "test.Ask+no"),
        query("work", "personal", "unknown.Service"),
        query("ghost", "personal", "test.Allow"),
    ]
    with running_daemon(tree):
        for data in calls:
            raw_call(tree.socket, data)
    records = tree.audit_records()
    assert len(records) == len(calls)
    for record in records:
        assert record.keys() >= FIELDS
        datetime.datetime.fromisoformat(str(record["time"]))
        assert record["channel"] == "policy.sock"
    policy_file = str(tree.policy_dir / "30-user.policy")
    allow, dom0, deny, ask_yes, ask_no, nomatch, ghost = records
    assert (allow["result"], allow["target"], allow["user"]) == ("allow", "personal", "DEFAULT")
    assert (allow["service"], allow["argument"]) == ("test.Allow", "+x")
    assert allow["rule"] == f"{policy_file}:1"
    assert (dom0["target"], dom0["user"], dom0["requested_target"]) == ("dom0", "root", "@adminvm")
    assert (deny["result"], deny["target"], deny["user"]) == ("deny", None, None)
    assert deny["rule"] == f"{policy_file}:9"
    assert "denied by" in str(deny["reason"])
    assert (ask_yes["result"], ask_yes["target"]) == ("ask-allowed", "personal")
    assert ask_yes["rule"] == f"{policy_file}:3"
    assert (ask_no["result"], ask_no["rule"]) == ("ask-denied", f"{policy_file}:3")
    assert nomatch["rule"] is None and "no rule matched" in str(nomatch["reason"])
    assert ghost["result"] == "deny" and "unknown source" in str(ghost["reason"])


def test_broken_system_info_is_an_error_record(tmp_path: Path) -> None:
    tree = PolicyTree(tmp_path)
    with running_daemon(tree):
        tree.system_info.write_text("{not json")
        assert raw_call(tree.socket, query("work", "personal", "test.Allow")) == b"result=deny\n"
        tree.system_info.write_text(json.dumps({"domains": {"work": {"uuid": UUIDS["work"]}}}))
        # A changed system info is re-read: personal no longer exists.
        assert raw_call(tree.socket, query("work", "personal", "test.Allow")) == b"result=deny\n"
    error, gone = tree.audit_records()
    assert error["result"] == "error" and "system info" in str(error["reason"])
    assert gone["result"] == "deny"


def test_audit_destinations(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rec = AuditRecord(
        channel="exec",
        source="work",
        requested_source=None,
        requested_target="@default",
        target=None,
        service="a.B",
        argument="+",
        result="deny",
        user=None,
        rule=None,
        reason="no rule matched",
    )
    path = tmp_path / "sub" / "audit.jsonl"
    log = AuditLog(str(path))
    log.record(rec)
    log.record(rec)
    log.close()
    lines = path.read_text().splitlines()
    assert len(lines) == 2 and all(line.startswith('{"time":') for line in lines)
    assert read_audit_log(str(path))[0]["reason"] == "no rule matched"
    assert "just_evaluate" not in read_audit_log(str(path))[0]
    AuditLog("-").record(rec)
    assert json.loads(capsys.readouterr().err)["service"] == "a.B"
