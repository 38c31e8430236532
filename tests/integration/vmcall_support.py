"""Emulated dom0 + VMs for VM-initiated call tests: our policy daemon deciding.

Builds on :class:`tests.integration.conftest.QrexecSystem` (agents and daemons as
processes tracked by pid, each test in its own folder) and adds what VM-initiated calls
need: ``qrexec-policy-daemon`` with policy files in the test's dom0 root, system info for
the VMs, a scripted prompter for ``ask``, the JSON-lines audit log, a trigger socket per
agent, and ``qrexec-client-vm`` runs inside a VM.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from qrexec.sim import processes
from qrexec.sim.testbed import find_program
from tests.integration.conftest import START_TIMEOUT, Domain, QrexecSystem

#: uuid of VM number n (domain id n).
UUID_PATTERN = "00000000-0000-4000-8000-{:012d}"


def vm_uuid(domid: int) -> str:
    return UUID_PATTERN.format(domid)


class VmCallSystem:
    """A QrexecSystem plus dom0's policy side."""

    def __init__(self, system: QrexecSystem) -> None:
        self.system = system
        self.base = system.base
        self.dom0_root = self.base / "roots" / "dom0"
        self.policy_socket = self.base / "policy.sock"
        self.system_info = self.base / "system-info.json"
        self.audit_log = self.base / "audit.jsonl"
        self.ask_script = self.base / "ask-answers"
        self.policy_d = self.dom0_root / "etc/qubes/policy.d"
        self.policy_2011 = self.dom0_root / "etc/qubes_rpc/policy"
        self.vms: dict[str, Domain] = {}
        self.policy_record: processes.ProcessRecord | None = None
        self.extra_info: dict[str, Any] = {}
        self.dom0_root.mkdir(parents=True, exist_ok=True)
        self.ask_script.write_text("")
        self.write_system_info({})

    # ---- dom0 ----

    def write_system_info(self, vms: Mapping[str, int], extra: Mapping[str, Any] = ()) -> None:
        """System info for dom0, the running ``vms`` and ``extra`` entries (kept for later
        rewrites; running VMs override them)."""
        self.extra_info.update(dict(extra))
        domains: dict[str, Any] = {
            "dom0": {"type": "AdminVM", "power_state": "Running", "uuid": vm_uuid(0)}
        }
        for name, info in self.extra_info.items():
            domains.setdefault(name, {}).update(info)
        for name, domid in vms.items():
            domains.setdefault(name, {}).update(
                {"uuid": vm_uuid(domid), "type": "AppVM", "power_state": "Running"}
            )
        self.system_info.write_text(json.dumps({"domains": domains}))

    def write_policy(self, text: str, name: str = "30-test.policy") -> Path:
        """A modern policy file in dom0's policy.d."""
        self.policy_d.mkdir(parents=True, exist_ok=True)
        path = self.policy_d / name
        path.write_text(text)
        return path

    def write_policy_2011(self, service: str, text: str) -> Path:
        """A 2011 per-service policy file (``/etc/qubes_rpc/policy/SERVICE`` in dom0)."""
        self.policy_2011.mkdir(parents=True, exist_ok=True)
        path = self.policy_2011 / service
        path.write_text(text)
        return path

    def write_dom0_service(self, name: str, text: str) -> Path:
        path = self.dom0_root / "etc/qubes-rpc" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        path.chmod(0o755)
        return path

    def dom0_env(self) -> dict[str, str]:
        """What dom0's programs (policy daemon, policy-exec, daemons) get."""
        return {
            "QREXEC_POLICY_SOCKET": str(self.policy_socket),
            "QREXEC_POLICY_PATH": str(self.policy_d),
            "QREXEC_2011_POLICY_DIR": str(self.policy_2011),
            "QREXEC_LEGACY_POLICY_DIR": str(self.dom0_root / "etc/qubes-rpc/policy"),
            "QREXEC_SYSTEM_INFO": str(self.system_info),
            "QREXEC_POLICY_AUDIT_LOG": str(self.audit_log),
            "QREXEC_POLICY_PROMPTER": f"scripted:{self.ask_script}",
            "QREXEC_POLICY_ASK_TIMEOUT": "20",
            "QREXEC_DOMAIN_ROOT": str(self.dom0_root),
            # Paths as dom0 sees them: resolved inside QREXEC_DOMAIN_ROOT.
            "QREXEC_SERVICE_PATH": "/etc/qubes-rpc",
            "QUBES_RPC_CONFIG_PATH": "/etc/qubes/rpc-config",
        }

    def start_policy_daemon(
        self, *extra: str, wrapper: Sequence[str] = (), env: Mapping[str, str] | None = None
    ) -> processes.ProcessRecord:
        argv = [
            *wrapper,
            sys.executable,
            "-m",
            "qrexec.policy.decision.daemon",
            "--socket-path",
            str(self.policy_socket),
            "--eval-socket-path",
            "",
            "--gui-socket-path",
            "",
            *extra,
        ]
        record, _ = processes.spawn(
            "policy",
            "dom0",
            argv,
            self.system.env(0, {**self.dom0_env(), **(env or {})}),
            self.system.logs / "policy.dom0.log",
        )
        self.system.records.append(record)
        self.policy_record = record
        processes.wait_for(
            self.policy_socket.exists, START_TIMEOUT, watch=[record], what="the policy daemon"
        )
        return record

    def audit(self) -> list[dict[str, Any]]:
        if not self.audit_log.exists():
            return []
        return [json.loads(line) for line in self.audit_log.read_text().splitlines() if line]

    # ---- VMs ----

    def agent_socket(self, name: str) -> Path:
        return self.base / f"agent.{name}.sock"

    def start_vm(
        self,
        name: str,
        domid: int,
        *,
        agent_env: Mapping[str, str] | None = None,
        daemon_env: Mapping[str, str] | None = None,
        daemon_args: Sequence[str] = (),
        agent_wrapper: Sequence[str] = (),
    ) -> Domain:
        system = self.system
        self.vms[name] = system.domain(name, domid)
        self.write_system_info({n: d.domid for n, d in self.vms.items()})
        env = {"QREXEC_AGENT_SOCKET": str(self.agent_socket(name))}
        env.update(agent_env or {})
        system.start_agent(name, domid, env, wrapper=agent_wrapper)
        denv = self.dom0_env()
        denv.update(daemon_env or {})
        args = ["-u", vm_uuid(domid), "--policy-program", policy_program(), *daemon_args]
        system.start_daemon(name, domid, denv, args=args)
        dom = system.domains[name]
        system.wait_connected(dom)
        processes.wait_for(
            self.agent_socket(name).exists, START_TIMEOUT, what=f"{name}'s trigger socket"
        )
        return dom

    def vm_env(self, name: str, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        dom = self.vms[name]
        env = {
            "QREXEC_AGENT_SOCKET": str(self.agent_socket(name)),
            "QREXEC_DOMAIN_ROOT": str(dom.root),
        }
        env.update(extra or {})
        return self.system.env(dom.domid, env)

    def client_vm_argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "qrexec.client.client_vm", *args]

    def call(
        self,
        source: str,
        *args: str,
        input: bytes = b"",
        env: Mapping[str, str] | None = None,
        timeout: float = 90,
    ) -> subprocess.CompletedProcess[bytes]:
        """Run ``qrexec-client-vm ARGS...`` inside ``source`` to completion."""
        return self.system.run(
            self.client_vm_argv(*args),
            self.vm_env(source, env),
            input=input,
            timeout=timeout,
            cwd=self.vms[source].root,
        )

    def popen_call(
        self, source: str, *args: str, env: Mapping[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        return self.system.popen(self.client_vm_argv(*args), self.vm_env(source, env))


def policy_program() -> str:
    """Our qrexec-policy-exec (the daemon's fallback), found as the testbed finds programs."""
    return find_program("qrexec-policy-exec")


@pytest.fixture
def vmcalls(qrexec_system: QrexecSystem) -> Iterator[VmCallSystem]:
    yield VmCallSystem(qrexec_system)


SERVICE_ECHO_ENV = """#!/bin/sh
echo "arg=$1"
echo "remote=$QREXEC_REMOTE_DOMAIN"
echo "full=$QREXEC_SERVICE_FULL_NAME"
echo "user=$(id -un)"
echo "type=$QREXEC_REQUESTED_TARGET_TYPE"
echo "target=${QREXEC_REQUESTED_TARGET-unset}"
echo "keyword=${QREXEC_REQUESTED_TARGET_KEYWORD-unset}"
cat
echo "to-stderr" >&2
exit 3
"""
