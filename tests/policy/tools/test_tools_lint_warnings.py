"""qubes-policy-lint: warnings (file:line, exit 0) for tokens that load but match no qube."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from qrexec.policy.tools import lint

POLICY = """\
# tokens Qubes loads although no qube can have them
test.Svc * uuid:1234 @anyvm allow
test.Svc * @anyvm bad$name deny
test.Svc * work @anyvm allow target=@dispvm:dom0
test.Svc * work @anyvm ask default_target=uuid:0
test.Svc * @anyvm @dispvm:uuid:00000000-0000-0000-0000-000000000000 deny
# fine everywhere
test.Svc * @anyvm @anyvm ask
test.Svc * work vault allow
test.Svc * work @dispvm:dvm allow
"""


def test_warnings_name_file_line_and_token(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "30-user.policy"
    path.write_text(POLICY)
    assert lint.main([str(path)]) == 0  # warnings only
    err = capsys.readouterr().err.splitlines()
    assert [line.split(": warning: ")[0] for line in err] == [
        f"{path}:2",
        f"{path}:3",
        f"{path}:4",
        f"{path}:5",
        f"{path}:6",
    ]
    assert "source 'uuid:1234' is not a well-formed uuid" in err[0]
    assert "target 'bad$name' is not a valid qube name" in err[1]
    assert "target= '@dispvm:dom0': dom0 is never a disposable template" in err[2]
    assert "default_target= 'uuid:0' is not a well-formed uuid" in err[3]
    assert "dom0 is never a disposable template" in err[4]
    assert all(line.endswith("it loads but matches no qube") for line in err)


def test_show_line_and_warnings_beside_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    warned = tmp_path / "10-warned.policy"
    warned.write_text("test.Svc * @anyvm uuid:1234 deny\n")
    broken = tmp_path / "20-broken.policy"
    broken.write_text("test.Svc * @anyvm @foo deny\n")
    assert lint.main(["-s", str(warned), str(broken)]) == 1  # the error fails, not the warning
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith(f"{warned}:1: warning: target 'uuid:1234'")
    assert err[1] == "    test.Svc * @anyvm uuid:1234 deny"
    assert err[2].startswith(f"{broken}:1: ") and "@foo" in err[2]
    assert ": warning: " not in err[2]


def test_system_info_adds_unknown_qubes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    info = tmp_path / "system.json"
    info.write_text(
        json.dumps(
            {
                "domains": {
                    "dom0": {"type": "AdminVM"},
                    "work": {"uuid": "11111111-1111-1111-1111-111111111111"},
                    "vault": {},
                    "dvm": {"template_for_dispvms": True},
                }
            }
        )
    )
    path = tmp_path / "30-user.policy"
    path.write_text(
        "test.Svc * work vault allow\n"
        "test.Svc * uuid:11111111-1111-1111-1111-111111111111 @dispvm:dvm allow\n"
        "test.Svc * work ghost allow\n"
        "test.Svc * work @anyvm allow target=@dispvm:vault\n"
        "test.Svc * uuid:99999999-9999-9999-9999-999999999999 @anyvm deny\n"
    )
    assert lint.main([str(path)]) == 0
    assert capsys.readouterr().err == ""  # without system info, these names could exist
    assert lint.main(["--system-info", str(info), str(path)]) == 0
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3
    assert err[0].startswith(f"{path}:3: warning: target 'ghost': no such qube")
    assert err[1].startswith(f"{path}:4: warning: target= '@dispvm:vault': vault is not a")
    assert err[2].startswith(f"{path}:5: warning: source 'uuid:9999")


def test_include_service_files_are_warned_too(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("$anyvm uuid:1234 allow\n"))
    assert lint.main(["-i", "-"]) == 0
    assert capsys.readouterr().err.startswith("<stdin>:1: warning: target 'uuid:1234'")


def test_console_script_exit_status(tmp_path: Path) -> None:
    """The installed command, as an admin runs it: warnings on stderr, exit 0."""
    path = tmp_path / "30-user.policy"
    path.write_text("test.Svc * @anyvm bad$name allow\n")
    script = Path(sys.executable).with_name("qubes-policy-lint")
    done = subprocess.run(
        [str(script), str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0
    assert done.stderr.startswith(f"{path}:1: warning: target 'bad$name'")
