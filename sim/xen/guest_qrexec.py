"""The real-Xen job's checks through this project's qrexec programs (run in dom0).

dom0 runs our ``qrexec-policy-daemon`` and one ``qrexec-daemon`` per domU, the domUs run
``qrexec-agent`` (see :mod:`guest_domu`); every program is pinned to the vchan transport
(``--transport vchan`` and ``QREXEC_TRANSPORT=vchan``). The checks drive calls with
``qrexec-client`` from dom0; VM-initiated calls are started inside vm1 as a dom0 -> vm1
command running ``qrexec-client-vm``, so their outcome comes back to dom0.

A check whose program is missing from the build FAILS (it never skips): the host only
lists such checks once the program exists.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from qrexec.sim.xen import guest_common as gc
from qrexec.sim.xen.guest_services import install_dom0_services

if TYPE_CHECKING:
    from collections.abc import Callable

SOCKET_DIR = Path("/var/run/qubes")
POLICY_SOCKET = Path("/run/qubes/policy.sock")
SYSTEM_INFO = Path("/run/qubes/system-info.json")
XEN_DOMAINS_CONF = Path("/etc/qubes/xen-domains.conf")
ENV = dict(os.environ, QREXEC_TRANSPORT="vchan", PYTHONPATH="/opt/qrexec-py")
ENV.pop("VCHAN_SOCKET_DIR", None)


class QrexecCheckFailed(Exception):
    """A qrexec check's expectation did not hold."""


def need(program: str) -> str:
    path = shutil.which(program, path=ENV.get("PATH"))
    if path is None:
        raise QrexecCheckFailed(f"program {program} does not exist in this build")
    return path


def wait_for_path(path: Path, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise QrexecCheckFailed(f"{what} did not appear at {path} within {timeout:.0f}s")
        time.sleep(0.2)


class JobState(Protocol):
    """What the qrexec checks need of dom0's job (:class:`.guest_dom0.Dom0Job`, which owns them)."""

    domids: dict[str, int]
    total: int


class QrexecChecks:
    def __init__(self, job: JobState) -> None:
        self.job = job
        self.procs: list[subprocess.Popen[bytes]] = []
        self.prepared = False

    def table(self) -> dict[str, Callable[[], str]]:
        return {
            "qrexec-setup": self.check_setup,
            "qrexec-dom0-to-vm": self.check_dom0_to_vm,
            "qrexec-vm-to-dom0": self.check_vm_to_dom0,
            "qrexec-test-add": self.check_test_add,
            "qrexec-bulk": self.check_bulk,
            "qrexec-refused": self.check_refused,
            "qrexec-latency": self.check_latency,
        }

    # -- set-up ----------------------------------------------------------------------

    def prepare(self) -> None:
        """Files only; the programs start in the ``qrexec-setup`` check."""
        install_dom0_services()

    def _spawn(self, args: list[str], log_name: str) -> subprocess.Popen[bytes]:
        log = open(f"/var/log/qubes/{log_name}", "ab")  # noqa: SIM115 - lives with the child
        proc = subprocess.Popen(args, env=ENV, stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def check_setup(self) -> str:
        """Write system info from xenstore, start the policy daemon and one daemon per VM."""
        XEN_DOMAINS_CONF.parent.mkdir(parents=True, exist_ok=True)
        XEN_DOMAINS_CONF.write_text(
            "# real-Xen job: what xenstore does not know\n[vm1]\ntags = job\n[vm2]\ntags = job\n"
        )
        subprocess.run(
            [
                need("qrexec-xen-system-info"),
                "--config",
                str(XEN_DOMAINS_CONF),
                "--output",
                str(SYSTEM_INFO),
            ],
            env=ENV,
            check=True,
            timeout=60,
        )
        info = json.loads(SYSTEM_INFO.read_text())
        if not {"dom0", "vm1", "vm2"} <= set(info["domains"]):
            raise QrexecCheckFailed(f"system info lacks domains: {sorted(info['domains'])}")
        POLICY_SOCKET.parent.mkdir(parents=True, exist_ok=True)
        self._spawn(
            [
                need("qrexec-policy-daemon"),
                "--socket-path",
                str(POLICY_SOCKET),
                "--policy-path",
                "/etc/qubes/policy.d",
                "--system-info",
                str(SYSTEM_INFO),
            ],
            "policy-daemon.log",
        )
        wait_for_path(POLICY_SOCKET, 60, "the policy daemon socket")
        for name, domid in self.job.domids.items():
            self._spawn(
                [
                    need("qrexec-daemon"),
                    "--direct",
                    "--transport",
                    "vchan",
                    *(
                        ["-u", info["domains"][name]["uuid"]]
                        if "uuid" in info["domains"][name]
                        else []
                    ),
                    str(domid),
                    name,
                    "root",
                ],
                f"qrexec.{name}.log",
            )
        for name, domid in self.job.domids.items():
            wait_for_path(SOCKET_DIR / f"qrexec.{domid}", 120, f"the qrexec-daemon of {name}")
        self.prepared = True
        return f"policy daemon + qrexec-daemon for {sorted(self.job.domids)} connected"

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()

    # -- calls -------------------------------------------------------------------------

    def client(
        self, vm: str, command: str, stdin: bytes = b"", timeout: float = 300
    ) -> subprocess.CompletedProcess[bytes]:
        if not self.prepared:
            raise QrexecCheckFailed("qrexec-setup did not succeed")
        return subprocess.run(
            [need("qrexec-client"), "-d", vm, command],
            input=stdin,
            capture_output=True,
            env=ENV,
            timeout=timeout,
            check=False,
        )

    def check_dom0_to_vm(self) -> str:
        proc = self.client(
            "vm1", 'root:echo out; echo err >&2; read x; echo "got $x"; exit 3', stdin=b"hello\n"
        )
        expected = (b"out\ngot hello\n", b"err\n", 3)
        got = (proc.stdout, proc.stderr, proc.returncode)
        if got != expected:
            raise QrexecCheckFailed(f"expected {expected!r}, got {got!r}")
        return "stdin/stdout/stderr and exit code 3 came back"

    def check_vm_to_dom0(self) -> str:
        proc = self.client("vm1", "root:echo ping | qrexec-client-vm dom0 qubes.JobEcho")
        if proc.returncode != 0 or proc.stdout != b"dom0 got ping from vm1\n":
            raise QrexecCheckFailed(
                f"rc={proc.returncode} out={proc.stdout!r} err={proc.stderr[-300:]!r}"
            )
        return "vm1 -> dom0 qubes.JobEcho allowed by policy"

    def check_test_add(self) -> str:
        proc = self.client(
            "vm1", "root:qrexec-client-vm vm2 test.Add /usr/bin/our_test_add_client 11 22"
        )
        if proc.returncode != 0 or proc.stderr.strip() != b"33":
            raise QrexecCheckFailed(
                f"rc={proc.returncode} out={proc.stdout!r} err={proc.stderr[-300:]!r}"
            )
        return "vm1 -> vm2 test.Add 11 22 = 33 (2011 seed client)"

    def check_bulk(self) -> str:
        total = self.job.total
        payload = b"".join(gc.pattern(total, 11))
        want_in = hashlib.sha256(payload).hexdigest()
        started = time.monotonic()
        proc = self.client("vm1", "root:sha256sum", stdin=payload)
        to_vm = time.monotonic() - started
        if proc.returncode != 0 or proc.stdout.split()[:1] != [want_in.encode()]:
            if proc.returncode == 0:
                raise _integrity(f"dom0->vm1 digest {proc.stdout[:64]!r} != {want_in}")
            raise QrexecCheckFailed(f"dom0->vm1 rc={proc.returncode} {proc.stderr[-300:]!r}")
        script = (
            "import sys; from qrexec.sim.xen.guest_common import pattern; "
            f"[sys.stdout.buffer.write(p) for p in pattern({total}, 12)]"
        )
        started = time.monotonic()
        proc = self.client("vm1", f"root:PYTHONPATH=/opt/qrexec-py python3 -c '{script}'")
        from_vm = time.monotonic() - started
        if proc.returncode != 0 or len(proc.stdout) != total:
            raise QrexecCheckFailed(
                f"vm1->dom0 rc={proc.returncode} got {len(proc.stdout)} "
                f"bytes {proc.stderr[-300:]!r}"
            )
        if hashlib.sha256(proc.stdout).hexdigest() != gc.pattern_digest(total, 12):
            raise _integrity("vm1->dom0 sha256 mismatch")
        up, down = total / to_vm / 1e6, total / from_vm / 1e6
        gc.marker("METRIC", "qrexec-bulk-dom0-to-vm", f"{up:.1f}", "MB/s")
        gc.marker("METRIC", "qrexec-bulk-vm-to-dom0", f"{down:.1f}", "MB/s")
        return f"{total >> 20} MiB each way byte-identical; {up:.1f} / {down:.1f} MB/s"

    def check_refused(self) -> str:
        proc = self.client("vm1", "root:qrexec-client-vm vm2 qubes.JobRefused; echo rc=$?")
        if b"rc=126" not in proc.stdout or b"never run" in proc.stdout:
            raise QrexecCheckFailed(f"out={proc.stdout!r} err={proc.stderr[-300:]!r}")
        return "denied by policy: qrexec-client-vm exited 126"

    def check_latency(self) -> str:
        rounds = 3
        started = time.monotonic()
        for _ in range(rounds):
            proc = self.client("vm1", "root:true")
            if proc.returncode != 0:
                raise QrexecCheckFailed(f"root:true rc={proc.returncode}")
        per_call = (time.monotonic() - started) / rounds
        started = time.monotonic()
        subprocess.run([need("qrexec-client"), "--help"], env=ENV, capture_output=True, check=False)
        start_cost = time.monotonic() - started
        gc.marker("METRIC", "qrexec-call-latency-dom0-to-vm", f"{per_call * 1e3:.0f}", "ms")
        gc.marker("METRIC", "qrexec-client-start", f"{start_cost * 1e3:.0f}", "ms")
        return (
            f"dom0->vm1 'true' {per_call * 1e3:.0f} ms per call, of which "
            f"{start_cost * 1e3:.0f} ms is starting qrexec-client"
        )


def _integrity(message: str) -> Exception:
    return gc.IntegrityFailed(message)
