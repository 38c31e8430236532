"""The policy daemon follows policy edits without a restart, and fails closed on bad ones."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from qrexec.policy.engine.policy import Policy
from qrexec.policy.loading.memory_store import policy_from_text
from qrexec.policy.loading.reload import RACY_SECONDS, ReloadingPolicy
from tests.policy.policy_daemon_harness import PolicyTree, query, raw_call, running_daemon

pytestmark = pytest.mark.timeout(120)

ALLOW = query("work", "personal", "test.Allow")
OTHER = query("work", "personal", "test.New")


def test_edit_break_fix_cycle(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    tree = PolicyTree(tmp_path)
    caplog.set_level(logging.INFO)
    with running_daemon(tree):
        assert raw_call(tree.socket, ALLOW).startswith(b"result=allow\n")
        assert raw_call(tree.socket, OTHER) == b"result=deny\n"

        # A new file in the directory is seen by the very next request.
        tree.write_policy("test.New * work personal allow\n", name="10-new.policy")
        assert raw_call(tree.socket, OTHER).startswith(b"result=allow\n")

        # An edit that breaks the syntax denies everything, even what was allowed ...
        tree.write_policy("test.New * work personal allow bogus=option\n", name="10-new.policy")
        assert raw_call(tree.socket, ALLOW) == b"result=deny\n"
        assert raw_call(tree.socket, OTHER) == b"result=deny\n"
        broken = [r for r in caplog.records if "DENIED until it is fixed" in r.getMessage()]
        assert len(broken) == 1 and "10-new.policy:1" in broken[0].getMessage()

        # ... until it is fixed.
        tree.write_policy("test.New * work personal deny\n", name="10-new.policy")
        assert raw_call(tree.socket, ALLOW).startswith(b"result=allow\n")
        assert raw_call(tree.socket, OTHER) == b"result=deny\n"
        assert any("policy fixed" in r.getMessage() for r in caplog.records)

        # Removing the file is a change too.
        (tree.policy_dir / "10-new.policy").unlink()
        assert raw_call(tree.socket, OTHER) == b"result=deny\n"

    reasons = [str(r["reason"]) for r in tree.audit_records()]
    assert any("policy failed to load" in reason for reason in reasons)


def test_bad_file_name_denies_everything(tmp_path: Path) -> None:
    tree = PolicyTree(tmp_path)
    with running_daemon(tree):
        tree.write_policy("", name="Bad Name.policy")
        assert raw_call(tree.socket, ALLOW) == b"result=deny\n"


def _counted_policy(tmp_path: Path) -> tuple[ReloadingPolicy, list[int], Path]:
    """A ReloadingPolicy over one real file, whose loads are counted."""
    path = tmp_path / "p.policy"
    path.write_text("a.B * work personal allow\n")
    loads: list[int] = []

    def load() -> Policy:
        loads.append(1)
        policy = policy_from_text(path.read_text(), str(path))
        return Policy(policy.rules, sources={str(path)})

    return ReloadingPolicy(load), loads, path


def test_unchanged_sources_are_not_reloaded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source, loads, _ = _counted_policy(tmp_path)
    # Pretend the file was last touched long ago (no racy window).
    monkeypatch.setattr("qrexec.policy.loading.reload.time.time_ns", lambda: 2**62)
    first = source.get_policy()
    for _ in range(5):
        assert source.get_policy() is first
    assert len(loads) == 1


def test_racy_fingerprints_are_not_trusted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two same-size edits within one timestamp tick give equal fingerprints; while the
    newest source is younger than RACY_SECONDS the policy is re-read anyway."""
    source, loads, path = _counted_policy(tmp_path)
    newest = 10**18
    stamp = ((str(path), (newest, newest, 26, 7, 0o100644)),)
    monkeypatch.setattr("qrexec.policy.loading.reload.fingerprint", lambda paths: stamp)
    monkeypatch.setattr("qrexec.policy.loading.reload.time.time_ns", lambda: newest + 1000)
    assert source.get_policy().rules[0].service == "a.B"
    path.write_text("a.C * work personal allow\n")  # same size, "same" fingerprint
    assert source.get_policy().rules[0].service == "a.C"
    # Once the clock has moved past the racy window the fingerprint is trusted again.
    monkeypatch.setattr(
        "qrexec.policy.loading.reload.time.time_ns", lambda: newest + int(2 * RACY_SECONDS * 1e9)
    )
    source.get_policy()
    n = len(loads)
    source.get_policy()
    assert len(loads) == n
