"""qubes-policy-lint, qrexec-policy-explain and qrexec-policy-graph, run in-process."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from qrexec.policy.tools import explain, graph, lint
from qrexec.sim.testbed import find_program
from tests.policy.policy_core_support import SYSTEM_DATA


@pytest.fixture
def dom0(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An emulated dom0: policy.d, legacy dirs and a system-info file, all under tmp_path."""
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "30-user.policy").write_text(
        "test.Add * vm1 vm2 allow user=root\n"
        "test.Add * @anyvm @anyvm ask default_target=vm3\n"
        "test.Copy +dir vm1 @default allow target=vm3\n"
        "test.Copy * vm1 @anyvm deny\n"
    )
    (tmp_path / "system.json").write_text(json.dumps(SYSTEM_DATA))
    monkeypatch.setenv("QREXEC_POLICY_PATH", f"{tmp_path / 'run'}:{etc}")
    monkeypatch.setenv("QREXEC_LEGACY_POLICY_DIR", str(tmp_path / "legacy"))
    monkeypatch.setenv("QREXEC_2011_POLICY_DIR", str(tmp_path / "old"))
    monkeypatch.setenv("QREXEC_SYSTEM_INFO", str(tmp_path / "system.json"))
    return tmp_path


# --- lint ------------------------------------------------------------------------------------


def test_lint_clean_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "10-good.policy"
    good.write_text("# ok\ntest.Svc * @anyvm @anyvm ask\n!include include/x\n")
    assert lint.main([str(good)]) == 0
    assert capsys.readouterr().err == ""


def test_lint_reports_every_bad_file_with_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = tmp_path / "10-good.policy"
    good.write_text("test.Svc * @anyvm @anyvm allow\n")
    bad = tmp_path / "20-bad.policy"
    bad.write_text("test.Svc * @anyvm @anyvm allow\ntest.Svc * @default vm1 allow\n")
    worse = tmp_path / "30-worse.policy"
    worse.write_text("* +x vm1 vm2 deny\n")
    assert lint.main(["-s", str(good), str(bad), str(worse)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith(f"{bad}:2: ") and "@default" in err[0]
    assert err[1] == "    test.Svc * @default vm1 allow"
    assert err[2].startswith(f"{worse}:1: ")
    assert len(err) == 4


def test_lint_bad_file_name_and_unreadable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad_name = tmp_path / "10-Bad.policy"
    bad_name.write_text("")
    assert lint.main([str(bad_name), str(tmp_path / "missing.policy")]) == 1
    err = capsys.readouterr().err
    assert "file name" in err and "missing.policy: cannot read" in err


def test_lint_stdin_and_include_service_syntax(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("$anyvm $dispvm allow,user=root\n"))
    assert lint.main(["-i", "-"]) == 0
    monkeypatch.setattr(sys, "stdin", io.StringIO("$anyvm $dispvm allow,user=root\n"))
    assert lint.main(["-"]) == 1  # not modern syntax
    assert capsys.readouterr().err.startswith("<stdin>:1: ")
    monkeypatch.setattr(sys, "stdin", io.StringIO("$anyvm allow\n"))
    assert lint.main(["-i", "-"]) == 1


# --- explain ---------------------------------------------------------------------------------


def test_explain_allow(dom0: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert explain.main(["vm1", "vm2", "test.Add"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "decision: allow" in out and "target: vm2" in out and "user: root" in out
    assert f"rule: {dom0}/etc/30-user.policy:1: test.Add * vm1 vm2 allow user=root" in out


def test_explain_ask_lists_candidates(dom0: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert explain.main(["vm3", "@default", "test.Add+x"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "decision: ask" in out
    assert (
        "candidates: @dispvm:default-dvm @dispvm:other-dvm default-dvm disp12 other-dvm "
        "tmpl vm1 vm2" in out
    )
    assert "default_target: (none)" in out  # vm3 is the source itself, never offered
    assert any(line.startswith("rule: ") and ":2: " in line for line in out)


def test_explain_deny_says_what_to_add(dom0: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert explain.main(["vm1", "vm2", "test.Sum"]) == 0
    out = capsys.readouterr().out
    assert "decision: deny" in out and "rule: (none)" in out
    assert f"add `test.Sum * vm1 vm2 allow` to {dom0}/etc/30-user.policy" in out


def test_explain_json_and_flags_override_env(
    dom0: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = tmp_path / "other"
    other.mkdir()
    (other / "10-x.policy").write_text("test.Add * vm1 @default allow target=@dispvm\n")
    assert explain.main(["--json", "--policy-path", str(other), "vm1", "", "test.Add"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["decision"] == "allow" and data["target"] == "@dispvm:default-dvm"
    assert data["rule"] == {
        "path": str(other / "10-x.policy"),
        "lineno": 1,
        "text": "test.Add * vm1 @default allow target=@dispvm",
    }


def test_explain_reports_broken_policy_and_system_info(
    dom0: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (dom0 / "etc" / "40-broken.policy").write_text("nonsense\n")
    assert explain.main(["vm1", "vm2", "test.Add"]) == 0
    assert f"{dom0}/etc/40-broken.policy:1:" in capsys.readouterr().out
    assert explain.main(["--system-info", str(dom0 / "nope.json"), "vm1", "vm2", "x"]) == 1
    assert "cannot read system info" in capsys.readouterr().err


# --- graph -----------------------------------------------------------------------------------


def test_graph_dot_output(dom0: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert graph.main(["--source", "vm1", "vm2"]) == 0
    dot = capsys.readouterr().out
    assert dot.startswith("digraph qrexec_policy {") and dot.rstrip().endswith("}")
    assert '"vm1" -> "vm2" [label="test.Add"];' in dot
    assert '"vm1" -> "vm3" [label="test.Copy+dir"];' in dot  # @default redirected to vm3
    assert "style=dashed" not in dot  # ask only with --include-ask
    assert '"vm2" ->' not in dot.replace('"vm1" -> "vm2"', "")  # vm2's calls are only asks


def test_graph_include_ask_skip_labels_full_output(
    dom0: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert graph.main(["--include-ask", "--source", "vm2", "--service", "test.Add"]) == 0
    dot = capsys.readouterr().out
    assert '"vm2" -> "vm3" [label="test.Add", style=dashed];' in dot
    assert '"vm2" -> "vm2"' not in dot
    assert graph.main(["--source", "vm1", "--skip-labels"]) == 0
    dot = capsys.readouterr().out
    assert '"vm1" -> "vm2";' in dot and "label=" not in dot
    assert graph.main(["--source", "vm1", "--target", "vm2", "--full-output"]) == 0
    assert f'label="test.Add\\n{dom0}/etc/30-user.policy:1"' in capsys.readouterr().out


def test_graph_output_files(dom0: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "g.dot"
    assert graph.main(["--output", str(out)]) == 0
    assert out.read_text().startswith("digraph")
    svg = tmp_path / "g.svg"
    code = graph.main(["--output", str(svg)])
    if shutil.which("dot"):
        assert code == 0 and "<svg" in svg.read_text()
    else:
        assert code == 1 and "Graphviz 'dot' is not installed" in capsys.readouterr().err


def test_graph_without_dot_is_a_clear_error(
    dom0: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    assert graph.main(["--output", str(tmp_path / "g.png")]) == 1
    assert "Graphviz 'dot' is not installed" in capsys.readouterr().err


def test_graph_refuses_a_broken_policy(dom0: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (dom0 / "etc" / "40-broken.policy").write_text("nonsense\n")
    assert graph.main([]) == 1
    assert "40-broken.policy:1" in capsys.readouterr().err


def test_console_scripts_are_installed() -> None:
    # Looked up beside the interpreter first: a venv's scripts are not on PATH unless the
    # venv is activated, and `.venv/bin/python -m pytest` must pass too.
    for name in (
        "qubes-policy-lint",
        "qrexec-policy-graph",
        "qrexec-legacy-convert",
        "qrexec-policy-explain",
    ):
        exe = find_program(name)
        proc = subprocess.run(
            [exe, "--help"], capture_output=True, text=True, timeout=60, check=False
        )
        assert proc.returncode == 0 and "usage:" in proc.stdout
