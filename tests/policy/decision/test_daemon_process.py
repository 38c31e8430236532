"""qrexec-policy-daemon as a real process configured by environment variables only."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.policy.policy_daemon_harness import PolicyTree, query, raw_call

pytestmark = pytest.mark.timeout(120)


def test_daemon_process_from_environment(tmp_path: Path) -> None:
    tree = PolicyTree(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("QREXEC_")}
    env.update(
        QREXEC_POLICY_SOCKET=str(tree.socket),
        QREXEC_POLICY_EVAL_SOCKET=str(tree.eval_socket),
        QREXEC_POLICY_GUI_SOCKET="",
        QREXEC_POLICY_PATH=str(tree.policy_dir),
        QREXEC_LEGACY_POLICY_DIR=str(tree.root / "legacy"),
        QREXEC_2011_POLICY_DIR=str(tree.root / "policy-2011"),
        QREXEC_SYSTEM_INFO=str(tree.system_info),
        QREXEC_POLICY_AUDIT_LOG=str(tree.audit),
        QREXEC_POLICY_PROMPTER=f"scripted:{tree.answers}",
        QREXEC_POLICY_ASK_TIMEOUT="5",
    )
    log = tree.root / "daemon.log"
    with log.open("wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "qrexec.policy.decision.daemon"], env=env, stderr=log_file
        )
    try:
        for _ in range(1000):
            if tree.eval_socket.exists() or proc.poll() is not None:
                break
            time.sleep(0.01)
        assert proc.poll() is None, log.read_text()
        assert raw_call(tree.socket, query("work", "personal", "test.Allow")).startswith(
            b"result=allow\n"
        )
        eval_reply = raw_call(
            tree.eval_socket,
            b"policy.EvalSimple+test.Allow vault\0work\0personal",
            half_close=True,
        )
        assert eval_reply == b"result=allow"
        assert not tree.gui_socket.exists()
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(30)
    assert code == 0, log.read_text()
    assert not tree.socket.exists() and not tree.eval_socket.exists()
    assert len(tree.audit_records()) == 2
    assert "serving policy on" in log.read_text()


def test_daemon_refuses_bad_settings(tmp_path: Path) -> None:
    tree = PolicyTree(tmp_path)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "qrexec.policy.decision.daemon",
            *tree.argv("--ask-prompter", "nope"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1 and "unknown prompter" in proc.stderr
    assert not tree.socket.exists()
