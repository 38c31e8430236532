"""A root agent switches to the requested user (spec §7); needs root (marker ``root``).

Each test creates throwaway accounts with useradd and removes them with userdel.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import QrexecSystem

pytestmark = [pytest.mark.root, pytest.mark.timeout(120)]


@pytest.fixture
def account() -> Iterator[str]:
    """A throwaway user with a throwaway supplementary group."""
    name = "qrx" + secrets.token_hex(4)
    group = name + "g"
    subprocess.run(["groupadd", group], check=True)
    subprocess.run(
        ["useradd", "--no-create-home", "--shell", "/bin/sh", "-G", group, name], check=True
    )
    try:
        yield name
    finally:
        subprocess.run(["userdel", name], check=False)
        subprocess.run(["groupdel", group], check=False)


@pytest.fixture
def open_system() -> Iterator[QrexecSystem]:
    """A system in a folder other users can enter (pytest's own folders are private)."""
    base = Path(tempfile.mkdtemp(prefix="qrx-"))
    base.chmod(0o755)
    system = QrexecSystem(base)
    try:
        yield system
    finally:
        system.stop_all()
        shutil.rmtree(base, ignore_errors=True)


def test_commands_run_as_the_requested_user_with_home_in_the_domain_root(
    open_system: QrexecSystem, account: str
) -> None:
    vm = open_system.start_vm("vm1", 1)
    result = open_system.client(
        "vm1", f"{account}:id -un; id -Gn; echo $HOME; pwd; echo $USER $LOGNAME $SHELL"
    )
    assert result.returncode == 0, result.stderr
    name, groups, home, cwd, variables = result.stdout.decode().splitlines()
    assert name == account
    assert f"{account}g" in groups.split()
    assert home == cwd == str(vm.root / "home" / account)
    assert variables == f"{account} {account} /bin/sh"
    stat = os.stat(home)
    assert stat.st_uid != 0 and (stat.st_mode & 0o777) == 0o700


def test_services_run_as_the_user_and_force_user_wins(
    open_system: QrexecSystem, account: str
) -> None:
    vm = open_system.start_vm("vm1", 1)
    vm.write_service("test.Who", '#!/bin/sh\necho "$(id -un) $1 $QREXEC_REMOTE_DOMAIN $HOME"\n')
    home = vm.root / "home" / account
    result = open_system.client("vm1", f"{account}:QUBESRPC test.Who+arg src")
    assert result.stdout == f"{account} arg src {home}\n".encode()
    vm.write_file("etc/qubes/rpc-config/test.Who", f"force-user = '{account}'\n")
    forced = open_system.client("vm1", "root:QUBESRPC test.Who+x src")
    assert forced.stdout == f"{account} x src {home}\n".encode()


def test_default_user_and_unknown_users(open_system: QrexecSystem, account: str) -> None:
    dom = open_system.domain("vm1", 1)
    open_system.start_agent("vm1", 1)
    open_system.start_daemon("vm1", 1, default_user=account)
    open_system.wait_connected(dom)
    assert open_system.client("vm1", "DEFAULT:id -un").stdout == f"{account}\n".encode()
    missing = open_system.client("vm1", "no-such-user-qrx:id -un")
    assert (missing.returncode, missing.stdout) == (125, b"")


def test_two_emulated_vms_never_share_a_home(open_system: QrexecSystem, account: str) -> None:
    open_system.start_vm("vm1", 1)
    open_system.start_vm("vm2", 2)
    write = open_system.client("vm1", f"{account}:echo secret > $HOME/note; echo $HOME")
    assert write.returncode == 0
    read = open_system.client("vm2", f"{account}:cat $HOME/note; echo $HOME")
    vm2_home = open_system.domains["vm2"].root / "home" / account
    assert read.stdout == f"{vm2_home}\n".encode()
    assert b"No such file" in read.stderr
    assert (open_system.domains["vm1"].root / "home" / account / "note").read_text() == "secret\n"
