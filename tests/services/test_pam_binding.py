"""The libpam binding and the PAM helper's rules, without root.

``pam_start_confdir`` reads service files from a test-owned folder, so real PAM modules
(``pam_permit``, ``pam_deny``, ``pam_env``, ``pam_exec``) run here as any user.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from qrexec.errors import PamError, ServiceError
from qrexec.services.pam import PamSession
from qrexec.services.pam_launch import status_error
from qrexec.services.pam_login import merge_environment
from qrexec.services.users import pam_configured, pam_service_name

PAM_AUTH_ERR = 7
USER = "nobody"


def write(folder: Path, name: str, text: str, mode: int = 0o644) -> Path:
    path = folder / name
    path.write_text(text)
    path.chmod(mode)
    return path


def test_a_permitted_session_opens_closes_and_exports_the_pam_environment(
    tmp_path: Path,
) -> None:
    conf = write(tmp_path, "env.conf", "QRX_PAM_MARK DEFAULT=from-pam\n")
    write(
        tmp_path,
        "svc",
        "auth required pam_permit.so\n"
        f"session required pam_env.so readenv=0 user_readenv=0 conffile={conf}\n",
    )
    session = PamSession("svc", USER, confdir=str(tmp_path))
    try:
        session.authenticate()
        session.establish_credentials()
        session.open_session()
        assert session.environment() == {"QRX_PAM_MARK": "from-pam"}
        session.close_session()
        session.delete_credentials()
    finally:
        session.end()
    session.end()  # idempotent
    with pytest.raises(PamError, match="has ended"):
        session.open_session()


def test_a_refusal_raises_pam_error_naming_the_step_and_reason(tmp_path: Path) -> None:
    write(tmp_path, "svc", "auth requisite pam_deny.so\n")
    session = PamSession("svc", USER, confdir=str(tmp_path))
    try:
        with pytest.raises(PamError) as caught:
            session.authenticate()
    finally:
        session.end()
    assert caught.value.step == "pam_authenticate"
    assert caught.value.code == PAM_AUTH_ERR
    assert str(caught.value) == "pam_authenticate: Authentication failure"
    assert isinstance(caught.value, ServiceError)  # so a call fails with 125


def test_every_prompt_is_answered_with_an_empty_string(tmp_path: Path) -> None:
    seen = tmp_path / "seen"
    script = write(
        tmp_path, "check.sh", f'#!/bin/sh\nread -r answer\necho "[$answer]" > {seen}\n', 0o755
    )
    # expose_authtok makes pam_exec ask the conversation for a password.
    write(tmp_path, "svc", f"auth required pam_exec.so quiet expose_authtok {script}\n")
    session = PamSession("svc", USER, confdir=str(tmp_path))
    try:
        session.authenticate()
    finally:
        session.end()
    assert seen.read_text() == "[]\n"


def test_pam_variables_never_replace_the_calls_own() -> None:
    call_env = {"HOME": "/root/home/u", "USER": "u", "PATH": "/bin", "QREXEC_AGENT_PID": "9"}
    pam_env = {
        "HOME": "/elsewhere",
        "USER": "x",
        "SHELL": "/bin/evil",
        "QREXEC_AGENT_PID": "1",
        "PATH": "/usr/bin",
        "LANG": "C.UTF-8",
    }
    assert merge_environment(call_env, pam_env) == {
        "HOME": "/root/home/u",
        "USER": "u",
        "PATH": "/usr/bin",
        "QREXEC_AGENT_PID": "9",
        "LANG": "C.UTF-8",
    }


def test_a_service_counts_as_configured_only_with_its_own_file(tmp_path: Path) -> None:
    etc, vendor = tmp_path / "etc-pam.d", tmp_path / "usr-pam.d"
    etc.mkdir()
    vendor.mkdir()
    write(vendor, "vendored", "auth required pam_permit.so\n")
    write(etc, "qrexec", "auth required pam_permit.so\n")
    dirs = (str(etc), str(vendor))
    assert pam_configured("qrexec", dirs)
    assert pam_configured("vendored", dirs)
    assert not pam_configured("other-name", dirs)
    assert not pam_configured("", dirs)
    # pam.conf counts only on a system without the pam.d folder, as libpam reads it.
    conf = write(tmp_path, "pam.conf", "# comment\nlegacy auth required pam_permit.so\n")
    assert not pam_configured("legacy", dirs, str(conf))
    no_pam_d = (str(tmp_path / "absent"), str(vendor))
    assert pam_configured("legacy", no_pam_d, str(conf))
    assert not pam_configured("qrexec", no_pam_d, str(conf))


def test_pam_service_names_are_plain_file_names() -> None:
    assert pam_service_name(None, {}) == "qrexec"
    assert pam_service_name(None, {"QREXEC_PAM_SERVICE": "mine"}) == "mine"
    assert pam_service_name("flag", {"QREXEC_PAM_SERVICE": "mine"}) == "flag"
    assert pam_service_name("", {"QREXEC_PAM_SERVICE": "mine"}) == ""
    for bad in ("../shadow", "a/b", "..", ".", "nul\0"):
        with pytest.raises(ServiceError, match="invalid PAM service name"):
            pam_service_name(bad, {})
    agent = subprocess.run(
        [sys.executable, "-m", "qrexec.agent.cli", "--pam-service", "a/b"],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert agent.returncode == 2
    assert b"invalid PAM service name 'a/b'" in agent.stderr


def test_helper_status_reports() -> None:
    assert status_error(b"S", None) is None
    assert status_error(b"E pam_authenticate: no", 125) == "pam_authenticate: no"
    assert status_error(b"SE cannot execute '/x': boom", None) == "cannot execute '/x': boom"
    assert "before opening a session" in (status_error(b"", 1) or "")
    assert "unexpected status" in (status_error(b"garbage", None) or "")
