"""qrexec-policy-exec: the CLI of spec §8, its output and exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from tests.policy.policy_daemon_harness import UUIDS, PolicyTree

pytestmark = pytest.mark.timeout(120)


def run(
    tree: PolicyTree, *args: str, env: dict[str, str] | None = None, use_env: bool = True
) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("QREXEC_")}
    if use_env:
        base.update(
            QREXEC_POLICY_PATH=str(tree.policy_dir),
            QREXEC_LEGACY_POLICY_DIR=str(tree.root / "legacy"),
            QREXEC_2011_POLICY_DIR=str(tree.root / "policy-2011"),
            QREXEC_SYSTEM_INFO=str(tree.system_info),
            QREXEC_POLICY_AUDIT_LOG=str(tree.audit),
            QREXEC_POLICY_PROMPTER=f"scripted:{tree.answers}",
        )
    base.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "qrexec.policy.tools.exec_cli", *args],
        env=base,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def tree(tmp_path: Path) -> PolicyTree:
    return PolicyTree(tmp_path)


def test_allow_prints_the_response_and_exits_0(tree: PolicyTree) -> None:
    proc = run(tree, "work", "personal", "test.Allow+arg")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == (
        "result=allow\nuser=DEFAULT\ntarget=personal\n"
        f"target_uuid=uuid:{UUIDS['personal']}\nautostart=True\nrequested_target=personal\n"
    )
    (record,) = [json.loads(line) for line in tree.audit.read_text().splitlines()]
    assert (record["channel"], record["result"]) == ("exec", "allow")


def test_deny_exits_1(tree: PolicyTree) -> None:
    proc = run(tree, "--", "work", "personal", "test.Deny")
    assert (proc.returncode, proc.stdout) == (1, "result=deny\n")
    nomatch = run(tree, "work", "personal", "no.Such")
    assert (nomatch.returncode, nomatch.stdout) == (1, "result=deny\n")


def test_ask_paths(tree: PolicyTree) -> None:
    tree.answers.write_text("test.Ask +yes * allow:vault\n* * * deny\n")
    assert run(tree, "work", "vault", "test.Ask").returncode == 1
    asked = run(tree, "work", "", "test.Ask+yes")
    assert asked.returncode == 0 and "target=vault\n" in asked.stdout
    yes = run(tree, "--assume-yes-for-ask", "work", "vault", "test.Ask")
    assert yes.returncode == 0 and "target=vault\n" in yes.stdout
    just = run(tree, "--just-evaluate", "work", "", "test.AskNoDefault")
    assert just.returncode == 0 and just.stdout.startswith("result=allow\n")
    results = [json.loads(line)["result"] for line in tree.audit.read_text().splitlines()]
    assert results == ["ask-denied", "ask-allowed", "ask-allowed", "ask-allowed"]


def test_flags_instead_of_environment(tree: PolicyTree) -> None:
    other = tree.root / "other.d"
    other.mkdir()
    (other / "10-x.policy").write_text("x.Y * work personal allow\n")
    proc = run(
        tree,
        "--path", str(other),
        "--system-info", str(tree.system_info),
        "--legacy-policy-dir", str(tree.root / "legacy"),
        "--policy-2011-dir", str(tree.root / "policy-2011"),
        "--audit-log", "-",
        "work", "personal", "x.Y",
        use_env=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stderr.splitlines()[-1])["service"] == "x.Y"
    # With the environment's policy directory instead, nothing allows x.Y.
    assert run(tree, "work", "personal", "x.Y").returncode == 1


def test_usage_errors_exit_2(tree: PolicyTree) -> None:
    five = run(tree, "12", "work", "personal", "test.Allow", "SOCKET7")
    assert five.returncode == 2 and "deprecated 5-argument form" in five.stderr
    assert five.stdout == ""
    two = run(tree, "work", "personal")
    assert two.returncode == 2 and "SOURCE TARGET SERVICE+ARG" in two.stderr
    bad = run(tree, "--ask-prompter", "zenity", "work", "personal", "test.Allow")
    assert bad.returncode == 2 and "unknown prompter" in bad.stderr


def test_qrexec_policy_is_an_alias() -> None:
    scripts = {ep.name: ep.value for ep in entry_points(group="console_scripts")}
    assert (
        scripts["qrexec-policy"]
        == scripts["qrexec-policy-exec"]
        == ("qrexec.policy.tools.exec_cli:main")
    )
