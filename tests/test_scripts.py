"""The per-call clients are installed as plain scripts (pyproject's script-files), not as
entry points: pip's entry-point wrapper imports ``re`` at every start (~2 ms a call).

These tests keep the scripts, pyproject and the Xen guest image's copies in step, and
check that starting a script loads no ``re``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from qrexec.sim.xen import images

ROOT = Path(__file__).resolve().parents[1]
CLIENTS = {"qrexec-client": "qrexec.client.cli", "qrexec-client-vm": "qrexec.client.client_vm"}


def test_pyproject_installs_each_client_as_a_plain_script_and_not_as_an_entry_point() -> None:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    files = data["tool"]["setuptools"]["script-files"]
    assert sorted(files) == sorted(f"scripts/{name}" for name in CLIENTS)
    assert not set(CLIENTS) & set(data["project"]["scripts"])
    for name, module in CLIENTS.items():
        path = ROOT / "scripts" / name
        assert os.access(path, os.X_OK)
        text = path.read_text()
        # setuptools rewrites a python shebang to the installing interpreter.
        assert text.startswith("#!/usr/bin/python3\n")
        assert f"from {module} import main\n" in text


@pytest.mark.parametrize("name", sorted(CLIENTS))
def test_a_client_script_starts_without_loading_re(name: str) -> None:
    # -S: an editable install's import hook loads re from site (a regular one does not).
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-S", "-X", "importtime", str(ROOT / "scripts" / name), "-h"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0 and "usage:" in done.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines()}
    assert "qrexec.client.options" in imported  # the probe sees our imports
    assert "re" not in imported


def test_the_xen_guest_image_gets_the_client_scripts_pointed_at_its_copy(tmp_path: Path) -> None:
    images._write_scripts(tmp_path)
    for name, module in CLIENTS.items():
        text = (tmp_path / name).read_text()
        assert text.startswith("#!/usr/bin/python3\nimport sys\n")
        assert f"sys.path.insert(0, '/{images.GUEST_PROJECT_DIR}')" in text
        assert f"from {module} import main" in text
        assert os.access(tmp_path / name, os.X_OK)
    assert (tmp_path / "qrexec-agent").exists()  # entry points are still written


def test_exit_now_flushes_python_buffers_and_keeps_the_code() -> None:
    done = subprocess.run(
        [sys.executable, "-c", EXIT_NOW_PROBE, "3"],
        capture_output=True,
        text=True,
        env=_buffered_env(),
        timeout=60,
        check=False,
    )
    assert (done.returncode, done.stdout, done.stderr) == (3, "out\n", "err\n")


def test_exit_now_gives_120_when_stdout_cannot_be_flushed_as_cpython_does() -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)  # flushing into this pipe fails with EPIPE
    try:
        done = subprocess.run(
            [sys.executable, "-c", EXIT_NOW_PROBE, "0"],
            stdout=write_end,
            stderr=subprocess.DEVNULL,
            env=_buffered_env(),
            timeout=60,
            check=False,
        )
    finally:
        os.close(write_end)
    assert done.returncode == 120


def _buffered_env() -> dict[str, str]:
    """This checkout importable, and Python's streams buffered (as for a user)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    return {**env, "PYTHONPATH": str(ROOT)}


#: Buffered output on both streams (stdout is block-buffered into a pipe), then exit_now.
EXIT_NOW_PROBE = """
import sys
from qrexec.client.process_exit import exit_now
print("out")
print("err", file=sys.stderr)
exit_now(int(sys.argv[1]))
"""
