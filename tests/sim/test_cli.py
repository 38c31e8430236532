"""The qrexec-sim command line: up with progress, exec/call exit codes, logs, down."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(120)

TOPOLOGY = """
[dom0]
ask = "* * * deny\\n"
[[dom0.policy]]
file = "30-t.policy"
text = "t.Cat * a b allow\\nt.Cat * @anyvm @anyvm deny\\n"
[[domain]]
name = "a"
[[domain]]
name = "b"
[[domain.service]]
name = "t.Cat"
script = "#!/bin/sh\\necho from b; cat; exit 5\\n"
"""


def sim(run_dir: Path, *args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "qrexec.sim.cli", "--run-dir", str(run_dir), *args],
        input=stdin,
        capture_output=True,
        timeout=90,
        check=False,
    )


@pytest.fixture
def run_dir(tmp_path: Path) -> Iterator[Path]:
    path = Path(f"/tmp/qsim-cli{os.getpid()}")
    (tmp_path / "t.toml").write_text(TOPOLOGY)
    up = sim(path, "up", "--topology", str(tmp_path / "t.toml"))
    assert up.returncode == 0, up.stderr.decode()
    assert b"a: agent said HELLO" in up.stderr and b"b: agent said HELLO" in up.stderr
    assert up.stdout.decode().strip() == str(path)
    yield path
    sim(path, "down")
    shutil.rmtree(path, ignore_errors=True)


def test_cli_round_trip(run_dir: Path) -> None:
    again = sim(run_dir, "up")
    assert again.returncode == 1 and b"already running" in again.stderr
    status = sim(run_dir, "status")
    assert status.returncode == 0
    lines = status.stdout.decode().splitlines()
    assert sum(line.endswith(" running") for line in lines) == 6  # dom0: 2, each VM: 2
    exec_ = sim(run_dir, "exec", "a", "DEFAULT:cat; exit 4", stdin=b"piped\n")
    assert (exec_.returncode, exec_.stdout) == (4, b"piped\n")
    call = sim(run_dir, "call", "a", "b", "t.Cat", stdin=b"x\n")
    assert (call.returncode, call.stdout) == (5, b"from b\nx\n")
    denied = sim(run_dir, "call", "b", "a", "t.Cat")
    assert denied.returncode == 126
    local = sim(run_dir, "call", "a", "b", "t.Cat", "--", "/bin/sh", "-c", "echo hi; exec cat >&2")
    assert (local.returncode, local.stderr) == (5, b"from b\nhi\n")
    logs = sim(run_dir, "logs", "-n", "3").stdout.decode()
    assert "==> daemon.a.log <==" in logs and "==> policy audit log <==" in logs
    audit = logs.split("==> policy audit log <==")[1].splitlines()
    assert any(line.startswith("allow") and "t.Cat+ a -> b" in line for line in audit)
    assert any(line.startswith("deny") and "t.Cat+ b -> a" in line for line in audit)
    raw = sim(run_dir, "logs", "--raw", "nothing-matches").stdout.decode()
    assert '"result": "deny"' in raw or '"result":"deny"' in raw
    down = sim(run_dir, "down")
    assert down.returncode == 0 and b"stopped 6 process(es)" in down.stderr
    assert sim(run_dir, "status").returncode == 1
    bad = sim(run_dir, "exec", "a", "DEFAULT:true")
    assert bad.returncode != 0


def test_bad_topology_and_run_dir_errors(tmp_path: Path) -> None:
    (tmp_path / "bad.toml").write_text('[[domain]]\nname = "a"\nflavour = 1\n')
    result = sim(Path("/tmp/qsim-never"), "up", "--topology", str(tmp_path / "bad.toml"))
    assert result.returncode == 1
    assert b"domain[a]: unknown key(s) flavour" in result.stderr
    long_dir = Path("/tmp/" + "x" * 60)
    result = sim(long_dir, "status")
    assert result.returncode == 1 and b"too long" in result.stderr
