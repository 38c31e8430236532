"""A multi-host topology running as one compose project: calls, policies and audits by host.

:class:`AirContainerTestbed` renders the compose file and the OpenSSH keys
(:mod:`.compose_air`) into a temporary folder, brings the project up under a unique name and
takes it down again (failing if anything of it is left). Calls run as
``qrexec-client-vm`` in the source container, as the domain's default account in its home,
with targets named ``HOST:VM`` (mapped to the source host's RemoteVM name, as
``qrexec-sim call`` does in process mode). Everything goes through the engine's exec and
archive APIs (:class:`~qrexec.sim.compose_project.ComposeProject`).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from qrexec.sim import roots
from qrexec.sim.air.air_topology import load_air_topology
from qrexec.sim.air.compose_air import render_air_compose, service_name, write_ssh_material
from qrexec.sim.air.testbed import AirTestbedError, local_name
from qrexec.sim.compose_project import ComposeProject, ComposeTestbedLifecycle, ExecResult
from qrexec.sim.container import AUDIT_LOG
from qrexec.sim.engine import REPO, Engine
from qrexec.sim.topology import PolicySpec


class AirContainerTestbed(ComposeTestbedLifecycle):
    """Every host of a multi-host topology file as containers of one compose project."""

    def __init__(
        self,
        engine: Engine,
        topology_file: str | Path,
        *,
        image: str,
        base: str,
        project: str | None = None,
    ) -> None:
        self.topology_file = Path(topology_file).resolve()
        self.air = load_air_topology(self.topology_file)
        self.dir = Path(tempfile.mkdtemp(prefix="qrexec-air-ctb-"))
        name = project or f"qrexec-air-{os.getpid()}-{secrets.token_hex(3)}"
        compose = self.dir / "compose.yaml"
        try:
            write_ssh_material(self.air, self.dir / "ssh")
            compose.write_text(
                render_air_compose(
                    self.air,
                    source=self.topology_file.name,
                    ssh_dir="./ssh",
                    topology_dir=str(self.topology_file.parent),
                    topology_name=self.topology_file.name,
                    build_context=str(REPO),
                )
            )
        except BaseException:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise
        env = {"QREXEC_SIM_IMAGE": image, "QREXEC_SIM_BASE": base}
        self.project = ComposeProject(engine, name, compose, env)

    # Names --------------------------------------------------------------------------------
    def service(self, qube: str) -> str:
        """The compose service of ``HOST:DOMAIN``."""
        host, colon, domain = qube.partition(":")
        if not colon:
            raise AirTestbedError(f"{qube!r} is not HOST:DOMAIN")
        names = {d.name for d in self.air.host(host).topology.domains}
        if domain not in names:
            raise AirTestbedError(f"{host} has no domain {domain!r}")
        return service_name(host, domain)

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
    ) -> ExecResult:
        """``qrexec-client-vm`` in ``HOST:VM`` for ``target`` (``HOST:VM`` or a local name)."""
        source_host = source.partition(":")[0]
        domain = self.air.host(source_host).topology.domain(source.partition(":")[2])
        local = local_name(self.air, source_host, target)
        return self.project.exec(
            self.service(source),
            ["qrexec-client-vm", local, service, *program],
            input=input,
            user=domain.default_user,
            workdir=f"/home/{domain.default_user}",
            timeout=timeout,
        )

    def run(
        self, qube: str, argv: Sequence[str], *, input: bytes | None = None, user: str = ""
    ) -> ExecResult:
        """Run a command straight in ``HOST:DOMAIN``'s container (no qrexec)."""
        return self.project.exec(self.service(qube), argv, input=input, user=user)

    # Policy and audit ---------------------------------------------------------------------
    def set_policy(self, host: str, text: str, *, file: str = "20-test.policy") -> str:
        """Write (or replace) one policy file of ``host``'s dom0; its path there."""
        spec = PolicySpec("modern", file, text)
        files: dict[str, tuple[bytes, int, int]] = {}
        with tempfile.TemporaryDirectory() as scratch:
            roots.install_policy(Path(scratch), spec)
            for path in Path(scratch).rglob("*"):
                if path.is_file():
                    files["/" + str(path.relative_to(scratch))] = (path.read_bytes(), 0o644, 0)
        self.project.write_files(service_name(host, "dom0"), files)
        return spec.path

    def remove_policy(self, host: str, path: str) -> None:
        """Remove a policy file of ``host``'s dom0 (the daemon sees the folder change)."""
        folder = str(Path(path).parent)
        done = self.run(f"{host}:dom0", ["sh", "-c", 'rm -f "$1" && touch "$2"', "-", path, folder])
        if done.returncode != 0:
            raise AirTestbedError(f"removing {path} on {host}: {done.stderr.decode().strip()}")

    def audit(self, host: str) -> list[dict[str, object]]:
        """``host``'s dom0 audit records, oldest first."""
        try:
            text = self.project.read_file(service_name(host, "dom0"), str(AUDIT_LOG)).decode()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def logs(self) -> str:
        """Every container's own output and its /var/log/qubes files (for failure reports)."""
        parts = []
        for service in sorted(self.project.containers()):
            parts.append(f"==> {service} (container) <==\n{self.project.logs(service)}")
            files = self.project.exec(
                service, ["sh", "-c", "tail -n 100 /var/log/qubes/*.log 2>/dev/null"]
            )
            if files.stdout:
                parts.append(f"==> {service}:/var/log/qubes <==\n{files.text}")
        return "\n".join(parts)
