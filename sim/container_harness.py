"""The container-mode testbed for service authors: the ``qrexec_testbed`` API on containers.

:class:`ContainerTestbed` runs a topology as a compose project (dom0 and one container per
VM, each with real accounts and a real file system, see sim/CONTAINERS.md) and offers the
helpers of :class:`~qrexec.sim.harness.RunningTestbed`: ``install_service``,
``install_file``, ``set_policy``, ``set_ask_answers``, ``call``, ``exec``, ``audit``,
``logs``, ``running_domains``. Files go into the containers through the engine's archive
API and commands run through its exec API (:mod:`qrexec.sim.compose_project`), so results
carry the real exit code and separate stdout and stderr.

Differences from process mode: there is no host path into a domain (``root``/``home`` do not
exist; use :meth:`read_file`); calls from a VM run as the domain's default user (``user``)
in its home, and program paths are the container's own.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shlex
import tempfile
from collections.abc import Sequence
from pathlib import Path

from qrexec.sim import roots
from qrexec.sim.compose import render_compose
from qrexec.sim.compose_project import ComposeProject, ComposeTestbedLifecycle, ExecResult
from qrexec.sim.container import ASK_SCRIPT, AUDIT_LOG, DAEMON_SOCKET_DIR, LOG_DIR, USER_UID
from qrexec.sim.engine import REPO, Engine
from qrexec.sim.topology import (
    POLICY_FORMATS,
    PolicySpec,
    ServiceSpec,
    Topology,
    TopologyError,
    default_topology,
    load_topology,
)

#: In-container interpreter (the image's); builtin services are bound to it.
IMAGE_PYTHON = "/usr/bin/python3"


def image_tag(context: Path = REPO) -> str:
    """The qrexec-sim image tag of this source tree (one per checkout, rebuilt per session;
    the engine's layer cache makes an unchanged rebuild cheap)."""
    return "qrexec-sim:fixture-" + hashlib.sha256(str(context).encode()).hexdigest()[:10]


class ContainerTestbed(ComposeTestbedLifecycle):
    """A topology running as containers; :meth:`close` removes every container and volume."""

    def __init__(
        self,
        engine: Engine,
        *,
        topology_file: str | Path | None = None,
        image: str,
        base: str,
        project: str | None = None,
    ) -> None:
        self.engine = engine
        self.topology_file = Path(topology_file).resolve() if topology_file else None
        self.topology: Topology = (
            load_topology(self.topology_file) if self.topology_file else default_topology()
        )
        self.dir = Path(tempfile.mkdtemp(prefix="qrexec-ctb-"))
        name = project or f"qrexec-fixture-{os.getpid()}-{secrets.token_hex(3)}"
        compose = self.dir / "compose.yaml"
        kw = {}
        if self.topology_file is not None:
            kw = {
                "topology_dir": str(self.topology_file.parent),
                "topology_name": self.topology_file.name,
            }
        compose.write_text(render_compose(self.topology, build_context=str(REPO), **kw))
        env = {"QREXEC_SIM_IMAGE": image, "QREXEC_SIM_BASE": base}
        self.project = ComposeProject(engine, name, compose, env)

    # Files --------------------------------------------------------------------------------
    def _install_tree(self, domain: str, build: Path) -> None:
        """Copy every file written under ``build`` (a scratch root) into the container."""
        files: dict[str, tuple[bytes, int, int]] = {}
        for path in sorted(build.rglob("*")):
            if path.is_file():
                inside = "/" + str(path.relative_to(build))
                files[inside] = (path.read_bytes(), path.stat().st_mode & 0o7777, 0)
        self.project.write_files(domain, files)

    def install_service(
        self,
        domain: str,
        name: str,
        script: str | None = None,
        *,
        program: str | None = None,
        rpc_config: str | None = None,
        directory: str | None = None,
    ) -> str:
        """Put a service into a domain; return its path inside the container."""
        spec = ServiceSpec.to_install(name, script, program, rpc_config, directory)
        with tempfile.TemporaryDirectory() as scratch:
            written = roots.install_service(Path(scratch), spec, python=IMAGE_PYTHON)
            self._install_tree(domain, Path(scratch))
            return "/" + str(written.relative_to(scratch))

    def install_file(
        self, domain: str, path: str, text: str, mode: int = 0o644, *, owner: str | None = None
    ) -> str:
        """Put a file at an absolute path of the container, owned by ``owner``: root or the
        domain's default account (the default for files under /home)."""
        if not path.startswith("/") or ".." in path.split("/"):
            raise TopologyError(f"install_file: {path!r} must be absolute, without '..'")
        user = self.topology.domain(domain).default_user
        if owner is None:
            owner = user if path.startswith("/home/") else "root"
        if owner not in ("root", user):
            raise TopologyError(f"install_file: owner must be root or {user}, not {owner!r}")
        uid = 0 if owner == "root" else USER_UID
        self.project.write_files(domain, {path: (text.encode(), mode, uid)})
        return path

    def read_file(self, domain: str, path: str) -> bytes:
        return self.project.read_file(domain, path)

    def set_policy(self, text: str, *, file: str = "20-test.policy", format: str = "modern") -> str:
        """Write (or replace) one policy file of dom0 (see RunningTestbed.set_policy)."""
        if format not in POLICY_FORMATS:
            raise TopologyError(f"policy format must be one of {POLICY_FORMATS}")
        spec = PolicySpec(format, file, text)
        with tempfile.TemporaryDirectory() as scratch:
            roots.install_policy(Path(scratch), spec)
            self._install_tree("dom0", Path(scratch))
        return spec.path

    def set_ask_answers(self, text: str) -> None:
        """Replace the scripted prompter's rules in dom0."""
        self.project.write_files("dom0", {str(ASK_SCRIPT): (text.encode(), 0o644, 0)})

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
        """Call ``service`` in ``target`` from ``source``: from dom0 ``qrexec-client -d``
        (no policy), from a VM ``qrexec-client-vm`` as the domain's default user, in its
        home, through dom0's policy."""
        if source == "dom0":
            argv = ["qrexec-client", "-d", target]
            if program:
                argv += ["-l", shlex.join(program)]
            argv.append(f"DEFAULT:QUBESRPC {service} dom0")
            return self.project.exec("dom0", argv, input=input, timeout=timeout)
        user = self.topology.domain(source).default_user
        return self.project.exec(
            source,
            ["qrexec-client-vm", target, service, *program],
            input=input,
            user=user,
            workdir=f"/home/{user}",
            timeout=timeout,
        )

    def exec(self, vm: str, cmdline: str, input: bytes = b"", timeout: float = 60.0) -> ExecResult:
        """Run ``USER:cmd`` in ``vm`` from dom0 (``qrexec-client -d``)."""
        return self.project.exec(
            "dom0", ["qrexec-client", "-d", vm, cmdline], input=input, timeout=timeout
        )

    def run(
        self, domain: str, argv: Sequence[str], input: bytes | None = None, user: str = ""
    ) -> ExecResult:
        """Run a command straight in a container (no qrexec), for setting up and looking."""
        return self.project.exec(domain, argv, input=input, user=user)

    # Looking ------------------------------------------------------------------------------
    def audit(self) -> list[dict[str, object]]:
        """dom0's policy audit records, oldest first."""
        try:
            text = self.project.read_file("dom0", str(AUDIT_LOG)).decode()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def running_domains(self) -> list[str]:
        """Domains whose qrexec-daemon has its agent's HELLO (dom0 included)."""
        listing = self.project.exec("dom0", ["ls", "-1", str(DAEMON_SOCKET_DIR)]).text.split()
        names = {entry.removeprefix("qrexec.") for entry in listing}
        known = {d.name for d in self.topology.domains}
        return sorted({"dom0"} | {n for n in names if n in known or n.startswith("disp")})

    def logs(self) -> str:
        """Every container's own output and its /var/log/qubes files (for failure reports)."""
        parts = []
        for service in sorted(self.project.containers()):
            parts.append(f"==> {service} (container) <==\n{self.project.logs(service)}")
            files = self.project.exec(
                service, ["sh", "-c", f"tail -n 200 {LOG_DIR}/*.log 2>/dev/null"]
            )
            if files.stdout:
                parts.append(f"==> {service}:{LOG_DIR} <==\n{files.text}")
        return "\n".join(parts)
