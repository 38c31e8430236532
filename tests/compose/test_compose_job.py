"""The compose job: the repository's compose.yaml (default topology) on a real Docker engine.

Marked ``compose`` (run by .ci/run as root). The session fixture ``qrexec_container_engine``
(sim/pytest_plugin.py) installs the engine's Debian packages when missing, starts a hardened
dockerd when none answers (and stops it at the end), builds the base image from the Debian
mirror when missing and the qrexec-sim image with the Docker SDK. This module brings
compose.yaml up under a unique project name with ``docker compose`` and checks calls across
containers through the SDK's exec (exit code, stdout and stderr apart), then ``down -v``.
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from qrexec.sim.compose_project import ComposeProject, ExecResult
from qrexec.sim.engine import Engine

pytestmark = [pytest.mark.compose, pytest.mark.timeout(900)]

REPO = Path(__file__).parents[2]
#: The seed's command name for qrexec-client-vm (a link in the image).
SEED_CLIENT_VM = "/usr/lib/qubes/qrexec_client_vm"
log = logging.getLogger(__name__)


@pytest.fixture(scope="module")
def job(
    qrexec_container_engine: tuple[Engine, str, str], request: pytest.FixtureRequest
) -> Iterator[ComposeProject]:
    engine, image, base = qrexec_container_engine
    name = f"qrexec-ci-{os.getpid()}-{secrets.token_hex(3)}"
    env = {"QREXEC_SIM_IMAGE": image, "QREXEC_SIM_BASE": base}
    project = ComposeProject(engine, name, REPO / "compose.yaml", env)
    try:
        project.up()
        yield project
        died = project.unexpected_exits()
        assert not died, f"containers died during the job: {died}"
    finally:
        if request.session.testsfailed:
            for service in sorted(project.containers()):
                log.error("--- %s ---\n%s", service, project.logs(service)[-3000:])
        project.down()
    assert project.leftovers() == []
    # Every container the job made was destroyed (the engine's events say so).
    destroyed = {
        e["Actor"]["Attributes"].get("com.docker.compose.service")
        for e in project.events()
        if e.get("Action") == "destroy"
    }
    assert {"dom0", "vm1", "vm2", "vm3", "default-dvm", "dispslot1", "dispslot2"} <= destroyed


def sh(job: ComposeProject, service: str, script: str, user: str = "") -> ExecResult:
    return job.exec(service, ["sh", "-c", script], user=user)


def test_every_container_healthy(job: ComposeProject) -> None:
    states = job.states()
    assert set(states) == {"dom0", "vm1", "vm2", "vm3", "default-dvm", "dispslot1", "dispslot2"}
    assert {(s.status, s.health) for s in states.values()} == {("running", "healthy")}


def test_dom0_to_vm_commands(job: ComposeProject) -> None:
    hello = job.exec(
        "dom0",
        ["qrexec-client", "-d", "vm1", "DEFAULT:echo hello from $(id -un) in $(cat /etc/hostname)"],
    )
    assert (hello.returncode, hello.stdout) == (0, b"hello from user in vm1\n")
    code = job.exec("dom0", ["qrexec-client", "-d", "vm2", "user:echo bye >&2; exit 7"])
    assert (code.returncode, code.stdout, code.stderr) == (7, b"", b"bye\n")


def test_seed_howto_as_written(job: ComposeProject) -> None:
    result = job.exec(
        "vm1",
        [SEED_CLIENT_VM, "vm2", "test.Add", "/usr/bin/our_test_add_client", "11", "22"],
        user="user",
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, b"", b"33\n")


def test_vm_to_dom0(job: ComposeProject) -> None:
    result = job.exec("vm1", ["qrexec-client-vm", "dom0", "sim.Echo"], input=b"ping\n")
    assert (result.returncode, result.stdout) == (0, b"dom0 echoes vm1: ping\n")


def test_filecopy_denied_then_allowed(job: ComposeProject) -> None:
    denied = job.exec("vm2", ["qrexec-client-vm", "vm1", "qubes.Filecopy"], input=b"")
    assert denied.returncode == 126
    assert b"Request refused" in denied.stderr
    sent = sh(
        job,
        "vm1",
        "mkdir -p ~/tree/sub && echo data >~/tree/sub/f && chmod 640 ~/tree/sub/f && "
        # qrexec-client-vm execs the program's path as given (no PATH search).
        'qrexec-client-vm vm2 qubes.Filecopy "$(command -v python3)" '
        "-m qrexec.sim.filecopy send ~/tree",
        user="user",
    )
    assert sent.returncode == 0, sent
    landed = sh(
        job, "vm2", 'f=~/QubesIncoming/vm1/tree/sub/f; echo "$(stat -c "%a %s" "$f") $(cat "$f")"',
        user="user",
    )  # fmt: skip
    assert landed.stdout == b"640 5 data\n"
    audit = job.read_file("dom0", "/var/log/qubes/policy-audit.log").decode()
    assert '"service":"qubes.Filecopy"' in audit.replace(" ", "")
    assert '"result":"deny"' in audit.replace(" ", "")


def test_disposables(job: ComposeProject) -> None:
    first = job.exec("vm1", ["qrexec-client-vm", "@dispvm", "sim.Echo"], input=b"hi\n")
    assert (first.returncode, first.stdout) == (0, b"disposable echoes vm1: hi\n")
    again = sh(
        job, "vm2",
        'for i in 1 2 3; do echo "$i" | qrexec-client-vm @dispvm sim.Echo'
        ' | grep -q "^disposable echoes vm2: $i$" || exit 1; done',
    )  # fmt: skip
    assert again.returncode == 0, again
    gone = sh(
        job, "dom0",
        'for i in $(seq 100); do ls /var/run/qubes | grep -q "^qrexec\\.disp" || exit 0;'
        " sleep 0.2; done; ls /var/run/qubes; exit 1",
    )  # fmt: skip
    assert gone.returncode == 0, gone
    wake = job.exec("vm1", ["qrexec-client-vm", "default-dvm", "sim.Echo"], input=b"wake\n")
    assert (wake.returncode, wake.stdout) == (0, b"disposable echoes vm1: wake\n")


def test_isolation(job: ComposeProject) -> None:
    pairs = job.exec("vm1", ["ls", "/run/vchan"]).text.split()
    assert pairs and all(p.startswith("pair.") for p in pairs)
    assert all(".1." in f"{p}." for p in pairs), pairs  # only pairs vm1 (id 1) belongs to
    assert job.exec("vm1", ["ls", "/run/vchan/pair.0.2"]).returncode != 0
    connect = job.exec(
        "vm1",
        ["python3", "-c", "import socket; socket.socket(socket.AF_UNIX).connect("
         "'/run/vchan/pair.0.2/vchan.2.0.512.sock')"],
    )  # fmt: skip
    assert connect.returncode == 1 and b"No such file or directory" in connect.stderr
    assert job.exec("dom0", ["test", "-d", "/run/vchan/pair.0.2"]).returncode == 0
