"""A running testbed as a service author's test sees it: install, set policy, call, look.

:class:`RunningTestbed` wraps :class:`~qrexec.sim.testbed.Testbed` with helpers that return
plain values (``CallResult`` with exit code, stdout and stderr), so a test reads like the
scenario it checks. The pytest plugin (:mod:`qrexec.sim.pytest_plugin`) hands these out;
they work the same from a script.

Changes made while the testbed runs go straight into the domains' file systems: the agent
looks services up per call, and the policy daemon reloads policy files when they change.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from qrexec.sim import processes, roots
from qrexec.sim.processes import ProcessRecord
from qrexec.sim.testbed import ProcessStatus, Progress, Testbed
from qrexec.sim.topology import POLICY_FORMATS, PolicySpec, ServiceSpec, Topology, TopologyError


@dataclasses.dataclass(frozen=True)
class CallResult:
    """What a client call returned."""

    returncode: int
    stdout: bytes
    stderr: bytes

    @property
    def text(self) -> str:
        """stdout decoded (for assertions on text services)."""
        return self.stdout.decode(errors="replace")


class RunningTestbed:
    """A started testbed plus helpers; :meth:`close` stops it and removes its folder."""

    def __init__(self, topology: Topology, run_dir: Path | None = None) -> None:
        self._own_dir = run_dir is None
        path = run_dir or Path(tempfile.mkdtemp(prefix="qsim", dir="/tmp"))
        self.testbed = Testbed(path, topology)
        self.topology = topology

    @property
    def run_dir(self) -> Path:
        return self.testbed.run.path

    def start(self, progress: Progress | None = None) -> RunningTestbed:
        if progress is None:
            self.testbed.up()
        else:
            self.testbed.up(progress=progress)
        return self

    def close(self) -> None:
        """Stop every process and remove the run directory (if this object made it)."""
        try:
            self.testbed.down()
        finally:
            if self._own_dir:
                shutil.rmtree(self.run_dir, ignore_errors=True)

    def __enter__(self) -> RunningTestbed:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # Files --------------------------------------------------------------------------------
    def root(self, domain: str) -> Path:
        """The domain's file system on the host."""
        return self.testbed.run.root(domain)

    def home(self, domain: str) -> Path:
        """The default user's home in the domain (process mode: the agents' account)."""
        return self.root(domain) / "home" / self.testbed.run.read_state().agent_user

    def install_service(
        self,
        domain: str,
        name: str,
        script: str | None = None,
        *,
        program: str | None = None,
        rpc_config: str | None = None,
        directory: str | None = None,
    ) -> Path:
        """Put a service into a domain (an inline script, or a 2011-style one-line file)."""
        spec = ServiceSpec.to_install(name, script, program, rpc_config, directory)
        return roots.install_service(self.root(domain), spec)

    def install_file(self, domain: str, path: str, text: str, mode: int = 0o644) -> Path:
        """Put a file at an absolute path of the domain's file system."""
        target = roots.inside(self.root(domain), path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        os.chmod(target, mode)
        return target

    def set_policy(
        self, text: str, *, file: str = "20-test.policy", format: str = "modern"
    ) -> Path:
        """Write (or replace) one policy file of dom0; ``format``: modern, r4.0 or 2011.

        A modern file sorts before the topology's own ``30-*.policy`` files by default, so
        its rules win.
        """
        if format not in POLICY_FORMATS:
            raise TopologyError(f"policy format must be one of {POLICY_FORMATS}")
        return roots.install_policy(self.root("dom0"), PolicySpec(format, file, text))

    def set_ask_answers(self, text: str) -> None:
        """Replace the scripted prompter's rules (``SERVICE ARGUMENT SOURCE ANSWER`` lines)."""
        target = self.testbed.run.ask_script
        tmp = target.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, target)

    # Calls --------------------------------------------------------------------------------
    def call(
        self,
        source: str,
        target: str,
        service: str,
        input: bytes = b"",
        *,
        program: Sequence[str] = (),
        timeout: float = 60.0,
    ) -> CallResult:
        """Call ``service`` in ``target`` from ``source`` (dom0: no policy; a VM: policy)."""
        argv, env, cwd = self.testbed.call_argv(source, target, service, program)
        done = self.testbed.run_client(argv, env, cwd=cwd, input=input, timeout=timeout)
        return CallResult(done.returncode, done.stdout, done.stderr)

    def start_call(
        self, source: str, target: str, service: str, *, program: Sequence[str] = ()
    ) -> subprocess.Popen[bytes]:
        """Start the call :meth:`call` makes without waiting for it (stdin, stdout and stderr
        are pipes; ``communicate(input)`` finishes it), for calls in flight together."""
        argv, env, cwd = self.testbed.call_argv(source, target, service, program)
        return subprocess.Popen(
            argv,
            env=env,
            cwd=cwd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )

    def exec(self, vm: str, cmdline: str, input: bytes = b"", timeout: float = 60.0) -> CallResult:
        """Run ``USER:cmd`` in ``vm`` from dom0 (``DEFAULT:`` is the agents' account)."""
        argv, env = self.testbed.exec_argv(vm, cmdline)
        done = self.testbed.run_client(argv, env, input=input, timeout=timeout)
        return CallResult(done.returncode, done.stdout, done.stderr)

    # Looking ------------------------------------------------------------------------------
    def wait_until(self, predicate: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
        """Wait for something the testbed does after a call returns (a disposable's removal)."""
        processes.wait_for(predicate, timeout, what=what)

    def status(self) -> list[ProcessStatus]:
        return self.testbed.status()

    def process(self, role: str, domain: str) -> ProcessRecord:
        """The recorded process of ``role`` (agent, daemon, policy-daemon, qubesd) in ``domain``."""
        for entry in self.testbed.status():
            if entry.record.role == role and entry.record.domain == domain:
                return entry.record
        raise KeyError(f"no {role} process for {domain}")

    def running_domains(self) -> list[str]:
        return sorted(n for n, d in self.testbed.domain_states().items() if d.running)

    def audit(self) -> list[dict[str, object]]:
        """The policy audit log's records, oldest first."""
        path = self.testbed.run.audit_log
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def logs(self) -> str:
        """Every log of the testbed, concatenated (for failure reports)."""
        parts = []
        for path in sorted(self.testbed.run.log_dir.glob("*.log")):
            parts.append(f"==> {path.name} <==\n{path.read_text(errors='replace')}")
        return "\n".join(parts)

    def rss_kib(self, role: str) -> list[int]:
        """Resident memory of every live process of ``role``, in KiB."""
        values = []
        for entry in self.testbed.status():
            if entry.record.role == role and entry.alive:
                rss = processes.rss_kib(entry.record.pid)
                if rss is not None:
                    values.append(rss)
        return values
