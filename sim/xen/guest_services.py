"""The qrexec services and policy the real-Xen job installs inside its guests.

Services are plain executables in the service directory, as in Qubes:

* ``test.Add`` (domUs): the 2011 seed's example - reads two numbers, prints their sum;
* ``qubes.JobEcho`` (dom0): echoes its input with the caller's name (VM -> dom0 call);
* ``qubes.JobRefused``: present everywhere, but the policy denies it (refused call).

The policy allows exactly the calls the job makes and denies ``qubes.JobRefused``. Runs
inside the guests; writes files only.
"""

from __future__ import annotations

from pathlib import Path

SERVICE_DIR = Path("/etc/qubes-rpc")
POLICY_DIR = Path("/etc/qubes/policy.d")
SEED_CLIENT = Path("/usr/bin/our_test_add_client")

TEST_ADD_SERVER = """#!/bin/sh
read arg1 arg2
echo $(($arg1+$arg2))
"""
# The seed's client prints its two arguments to the service, then copies the answer to
# its stderr (qrexec-client-vm connects its stdin/stdout to the service).
TEST_ADD_CLIENT = """#!/bin/sh
echo $1 $2
exec cat >&2
"""
JOB_ECHO = """#!/bin/sh
echo "dom0 got $(cat) from $QREXEC_REMOTE_DOMAIN"
"""
JOB_REFUSED = """#!/bin/sh
echo "this service must never run"
"""
POLICY = """\
# real-Xen job policy (qrexec-py): exactly the calls the job makes.
test.Add        *   vm1     vm2     allow
qubes.JobEcho   *   vm1     dom0    allow
qubes.JobRefused *  @anyvm  @anyvm  deny
"""


def _write(path: Path, text: str, mode: int = 0o755) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)


def install_domu_services(name: str) -> None:
    del name  # both domUs get the same services
    _write(SERVICE_DIR / "test.Add", TEST_ADD_SERVER)
    _write(SERVICE_DIR / "qubes.JobRefused", JOB_REFUSED)
    _write(SEED_CLIENT, TEST_ADD_CLIENT)


def install_dom0_services() -> None:
    _write(SERVICE_DIR / "qubes.JobEcho", JOB_ECHO)
    _write(SERVICE_DIR / "qubes.JobRefused", JOB_REFUSED)
    _write(POLICY_DIR / "30-xen-job.policy", POLICY, 0o644)
