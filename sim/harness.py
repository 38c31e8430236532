"""A running testbed as a service author's test sees it: install, set policy, call, look.

:class:`RunningTestbed` wraps :class:`~qrexec.sim.testbed.Testbed` with helpers that return
plain values (``CallResult`` with exit code, stdout and stderr), so a test reads like the
scenario it checks. The pytest plugin (:mod:`qrexec.sim.pytest_plugin`) hands these out;
they work the same from a script.

Changes made while the testbed runs go straight into the domains' file systems: the agent
looks services up per call, and the policy daemon reloads policy files when they change.

Calls (``call``, ``exec``, ``start_call``) go through the in-process client
(:mod:`qrexec.client.api`): no process per call, so a test suite runs fast. ``spawn_cli=True``
runs the real ``qrexec-client``/``qrexec-client-vm`` instead (that path deserves tests too),
and so does a call with a local program. A qrexec failure that the API raises (no daemon,
no agent, the data connection lost) comes back as exit code 125 with the reason on stderr,
as the CLI reports it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import queue
import shutil
import subprocess
import tempfile
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

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


if TYPE_CHECKING:
    from qrexec.client.api import CallResult as ApiResult
    from qrexec.client.api import Input


def _from_api(run: Callable[[], ApiResult]) -> CallResult:
    from qrexec.errors import CallTimeout, QrexecError

    try:
        result = run()
    except CallTimeout:
        raise
    except QrexecError as exc:
        return CallResult(125, b"", f"{exc}\n".encode())
    return CallResult(result.returncode, result.stdout or b"", result.stderr or b"")


class InProcessCall:
    """What :meth:`RunningTestbed.start_call` returns in process mode: the call runs at once
    in a thread of its own through the in-process client; ``communicate(input)`` feeds its
    input and waits, like :class:`subprocess.Popen`'s."""

    def __init__(self, start: Callable[[Input], ApiResult]) -> None:
        self._chunks: queue.Queue[bytes | None] = queue.Queue()
        self._result: CallResult | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, args=(start,), daemon=True)
        self._thread.start()

    async def _input(self) -> AsyncIterator[bytes]:
        import asyncio

        loop = asyncio.get_running_loop()
        while (chunk := await loop.run_in_executor(None, self._chunks.get)) is not None:
            yield chunk

    def _main(self, start: Callable[[Input], ApiResult]) -> None:
        try:
            self._result = _from_api(lambda: start(self._input()))
        except BaseException as exc:
            self._error = exc

    @property
    def returncode(self) -> int | None:
        return None if self._result is None else self._result.returncode

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise subprocess.TimeoutExpired("in-process qrexec call", timeout or 0)
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result.returncode

    def communicate(
        self, input: bytes | None = None, timeout: float | None = None
    ) -> tuple[bytes, bytes]:
        if input:
            self._chunks.put(input)
        self._chunks.put(None)
        self.wait(timeout)
        assert self._result is not None
        return self._result.stdout, self._result.stderr


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
        spawn_cli: bool = False,
    ) -> CallResult:
        """Call ``service`` in ``target`` from ``source`` (dom0: no policy; a VM: policy).

        In process unless ``spawn_cli`` or a local ``program`` asks for the real client.
        """
        if not spawn_cli and not program:
            start = self._api_call(source, target, service, timeout)
            return _from_api(lambda: start(input))
        argv, env, cwd = self.testbed.call_argv(source, target, service, program)
        done = self.testbed.run_client(argv, env, cwd=cwd, input=input, timeout=timeout)
        return CallResult(done.returncode, done.stdout, done.stderr)

    def start_call(
        self,
        source: str,
        target: str,
        service: str,
        *,
        program: Sequence[str] = (),
        spawn_cli: bool = False,
    ) -> subprocess.Popen[bytes] | InProcessCall:
        """Start the call :meth:`call` makes without waiting for it (``communicate(input)``
        finishes it), for calls in flight together. With ``spawn_cli`` or a ``program``, a
        :class:`subprocess.Popen` of the real client (stdin, stdout and stderr are pipes)."""
        if not spawn_cli and not program:
            return InProcessCall(self._api_call(source, target, service, None))
        argv, env, cwd = self.testbed.call_argv(source, target, service, program)
        return subprocess.Popen(
            argv,
            env=env,
            cwd=cwd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )

    def _api_call(
        self, source: str, target: str, service: str, timeout: float | None
    ) -> Callable[[Input], ApiResult]:
        """A function running the call in process with the input it is given."""
        from qrexec.client.api import Dom0Client, VmClient

        if source == "dom0":
            dom0 = Dom0Client(self.testbed.dom0_env())
            return lambda data: dom0.call(target, service, input=data, timeout=timeout)
        state = self.testbed.run.read_state()
        if source not in state.domains:
            from qrexec.sim.testbed import TestbedError

            raise TestbedError(f"no domain named {source!r} in this testbed")
        vm = VmClient(self.testbed.vm_env(source, state.domains[source].id))
        return lambda data: vm.call(target, service, input=data, timeout=timeout)

    def exec(
        self,
        vm: str,
        cmdline: str,
        input: bytes = b"",
        timeout: float = 60.0,
        *,
        spawn_cli: bool = False,
    ) -> CallResult:
        """Run ``USER:cmd`` in ``vm`` from dom0 (``DEFAULT:`` is the agents' account);
        in process unless ``spawn_cli``."""
        if not spawn_cli:
            from qrexec.client.api import Dom0Client

            dom0 = Dom0Client(self.testbed.dom0_env())
            return _from_api(lambda: dom0.run(vm, cmdline, input=input, timeout=timeout))
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
