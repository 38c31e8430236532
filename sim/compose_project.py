"""One compose project on the Docker engine: up and down by ``docker compose``, the rest by SDK.

``docker compose up``/``down`` stay on the CLI because the SDK has no compose; everything else
goes through the Docker SDK and the engine's API, never through parsed CLI text: the
project's containers (by compose's labels), their state and health, ``exec`` with the exit
code and stdout/stderr kept apart, reading and writing files (the archive API), logs, the
engine's events, and the cleanup of whatever ``down`` left.

Only objects labelled with this project's name are ever touched, so several projects (of
other test runs or other users of the engine) can live side by side.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import shutil
import socket
import struct
import tarfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any, Self

import docker.errors
from docker.models.containers import Container

from qrexec.sim.engine import Engine, EngineError
from qrexec.sim.topology import TopologyError

log = logging.getLogger("qrexec.sim.compose_project")

PROJECT_LABEL = "com.docker.compose.project"
SERVICE_LABEL = "com.docker.compose.service"
#: The engine's multiplexed attach stream: {u8 stream, 3 pad, u32 big-endian length}.
_FRAME = struct.Struct(">BxxxI")
_STDERR = 2
Filters = dict[str, str | list[str] | bool]


@dataclasses.dataclass(frozen=True)
class ExecResult:
    """What a command run in a container returned."""

    returncode: int
    stdout: bytes
    stderr: bytes

    @property
    def text(self) -> str:
        return self.stdout.decode(errors="replace")


@dataclasses.dataclass(frozen=True)
class ContainerState:
    """A container's state as the engine reports it."""

    service: str
    status: str  # created, running, exited...
    health: str | None  # starting, healthy, unhealthy; None without a healthcheck
    exit_code: int


class ComposeProject:
    """The compose project ``name`` of ``compose_file`` on ``engine``."""

    def __init__(
        self, engine: Engine, name: str, compose_file: Path, env: Mapping[str, str] = {}
    ) -> None:
        self.engine = engine
        self.name = name
        self.compose_file = compose_file
        self.env = dict(env)
        self.started_at = 0.0

    @property
    def client(self) -> docker.DockerClient:
        return self.engine.client

    def _compose(self, *args: str) -> str:
        return self.engine.compose(
            "-p", self.name, "-f", str(self.compose_file), *args,
            cwd=self.compose_file.parent, env=self.env,
        )  # fmt: skip

    # Life cycle ---------------------------------------------------------------------------
    def up(self, timeout: float = 180.0) -> None:
        """``docker compose up -d --wait``; on failure, say which containers are not healthy."""
        self.cleanup()
        self.started_at = time.time()
        try:
            self._compose("up", "-d", "--no-build", "--wait", "--wait-timeout", str(int(timeout)))
        except EngineError as exc:
            states = ", ".join(f"{s.service}={s.status}/{s.health}" for s in self.states().values())
            raise EngineError(f"{exc}\ncontainers: {states}") from exc

    def down(self) -> None:
        """``docker compose down -v``, then remove anything of the project that is left."""
        try:
            self._compose("down", "-v", "-t", "2", "--remove-orphans")
        finally:
            self.cleanup()

    def cleanup(self) -> list[str]:
        """Remove this project's containers, volumes and networks (only those); return what
        was removed."""
        removed = []
        label: Filters = {"label": f"{PROJECT_LABEL}={self.name}"}
        for container in self.client.containers.list(all=True, filters=label):
            container.remove(force=True, v=True)
            removed.append(f"container {container.name}")
        for volume in self.client.volumes.list(filters=label):
            volume.remove(force=True)
            removed.append(f"volume {volume.name}")
        for network in self.client.networks.list(filters=label):
            network.remove()
            removed.append(f"network {network.name}")
        if removed:
            log.info("project %s: removed %s", self.name, ", ".join(removed))
        return removed

    def leftovers(self) -> list[str]:
        """Containers, volumes and networks of this project that still exist."""
        label: Filters = {"label": f"{PROJECT_LABEL}={self.name}"}
        return (
            [f"container {c.name}" for c in self.client.containers.list(all=True, filters=label)]
            + [f"volume {v.name}" for v in self.client.volumes.list(filters=label)]
            + [f"network {n.name}" for n in self.client.networks.list(filters=label)]
        )

    # Looking ------------------------------------------------------------------------------
    def containers(self) -> dict[str, Container]:
        """The project's containers by compose service name."""
        label: Filters = {"label": f"{PROJECT_LABEL}={self.name}"}
        found = self.client.containers.list(all=True, filters=label)
        return {c.labels.get(SERVICE_LABEL) or str(c.name): c for c in found}

    def container(self, service: str) -> Container:
        try:
            return self.containers()[service]
        except KeyError:
            raise EngineError(f"project {self.name} has no container {service!r}") from None

    def states(self) -> dict[str, ContainerState]:
        result = {}
        for service, container in sorted(self.containers().items()):
            container.reload()
            state: dict[str, Any] = container.attrs["State"]
            health = state.get("Health", {}).get("Status")
            result[service] = ContainerState(
                service, state["Status"], health, int(state.get("ExitCode", 0))
            )
        return result

    def events(self, since: float | None = None) -> list[dict[str, Any]]:
        """The engine's container events of this project from ``since`` (default: up) to now."""
        start = int(since if since is not None else self.started_at)
        stream = self.client.events(
            since=start,
            until=int(time.time()) + 1,
            filters={"type": "container", "label": f"{PROJECT_LABEL}={self.name}"},
            decode=True,
        )
        return list(stream)

    def unexpected_exits(self, since: float | None = None) -> list[str]:
        """Containers that died since ``since`` with a non-zero code (a crashed domain)."""
        exits = []
        for event in self.events(since):
            if event.get("Action") == "die":
                attrs = event.get("Actor", {}).get("Attributes", {})
                code = attrs.get("exitCode", "0")
                if code != "0":
                    exits.append(f"{attrs.get(SERVICE_LABEL, attrs.get('name'))} exited {code}")
        return exits

    def logs(self, service: str) -> str:
        """The container's own output (its supervisor's log)."""
        return self.container(service).logs(stdout=True, stderr=True).decode(errors="replace")

    # Files --------------------------------------------------------------------------------
    def read_file(self, service: str, path: str) -> bytes:
        """A regular file from the container's file system (the archive API)."""
        try:
            chunks, _stat = self.container(service).get_archive(path)
        except docker.errors.NotFound:
            raise FileNotFoundError(f"{service}:{path}") from None
        with tarfile.open(fileobj=io.BytesIO(b"".join(chunks))) as tar:
            member = tar.next()
            if member is None or not member.isfile():
                raise EngineError(f"{service}:{path} is not a regular file")
            extracted = tar.extractfile(member)
            assert extracted is not None
            return extracted.read()

    def write_files(self, service: str, files: Mapping[str, tuple[bytes, int, int]]) -> None:
        """Write files (absolute path -> (content, mode, uid)) into the container; missing
        parent folders are created by the engine."""
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            for path, (content, mode, uid) in files.items():
                info = tarfile.TarInfo(str(PurePosixPath(path).relative_to("/")))
                info.size, info.mode, info.uid, info.gid = len(content), mode, uid, uid
                info.mtime = int(time.time())
                tar.addfile(info, io.BytesIO(content))
        if not self.container(service).put_archive("/", buffer.getvalue()):
            raise EngineError(f"writing {', '.join(files)} into {service} failed")

    # Commands -----------------------------------------------------------------------------
    def exec(
        self,
        service: str,
        argv: Sequence[str],
        *,
        input: bytes | None = None,
        user: str = "",
        workdir: str | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float = 60.0,
    ) -> ExecResult:
        """Run ``argv`` in the container; stdin gets ``input`` then end of file.

        The engine's exec API with the attach stream demultiplexed here, so stdout and
        stderr stay apart and the exit code is the command's own.
        """
        api = self.client.api
        container = self.container(service)
        created = api.exec_create(
            container.id, list(argv), stdin=input is not None, stdout=True, stderr=True,
            user=user, workdir=workdir, environment=dict(env) if env else None,
        )  # fmt: skip
        exec_id = created["Id"]
        attached = api.exec_start(exec_id, socket=True)
        # On a unix or TCP engine socket the SDK hands out a SocketIO around the socket.
        sock = getattr(attached, "_sock", None)
        if not isinstance(sock, socket.socket):
            raise EngineError(f"unsupported engine connection {type(attached).__name__}")
        sock.settimeout(timeout)
        writer = None
        if input is not None:
            writer = threading.Thread(target=_feed, args=(sock, input), daemon=True)
            writer.start()
        try:
            out, err = read_attach_stream(sock)
        except TimeoutError:
            raise EngineError(f"{service}: {argv[0]} did not finish within {timeout} s") from None
        finally:
            sock.close()
            if writer is not None:
                writer.join(5)
        deadline = time.monotonic() + 10
        while True:
            info = api.exec_inspect(exec_id)
            if not info["Running"] or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        code = info["ExitCode"]
        return ExecResult(code if code is not None else -1, out, err)


def read_attach_stream(sock: socket.socket) -> tuple[bytes, bytes]:
    """(stdout, stderr) of an engine attach stream without a tty, read to its end.

    Each frame is ``{u8 stream, 3 pad, u32 big-endian length}`` then the payload; stream 1 is
    stdout, 2 stderr (0, stdin echo, never comes without a tty and is counted as stdout).
    """
    out, err = bytearray(), bytearray()
    while True:
        header = _recv_exact(sock, _FRAME.size)
        if not header:
            return bytes(out), bytes(err)
        stream, length = _FRAME.unpack(header)
        (err if stream == _STDERR else out).extend(_recv_exact(sock, length, inside=True))


def _feed(sock: socket.socket, data: bytes) -> None:
    """Write stdin, then half-close: the engine closes the command's stdin on our EOF."""
    try:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
    except OSError as exc:  # the command exited without reading everything
        log.debug("exec stdin: %s", exc)


def _recv_exact(sock: socket.socket, size: int, *, inside: bool = False) -> bytes:
    """``size`` bytes, or b"" at a clean end of stream before the first byte of a frame."""
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(min(size - len(data), 1 << 20))
        if not chunk:
            if data or inside:
                raise EngineError("the engine's attach stream ended inside a frame")
            return b""
        data.extend(chunk)
    return bytes(data)


class ComposeTestbedLifecycle:
    """Start and stop of a test's compose project kept in its own scratch folder.

    Shared by the single-host :class:`~qrexec.sim.container_harness.ContainerTestbed` and
    the multi-host :class:`~qrexec.sim.air.container_testbed.AirContainerTestbed`; the
    subclass sets :attr:`project` and :attr:`dir` (the folder holding its compose file).
    """

    project: ComposeProject
    dir: Path

    def start(self, timeout: float = 180.0) -> Self:
        self.project.up(timeout)
        return self

    def close(self) -> None:
        """``compose down -v``; fails if anything of the project is left."""
        try:
            self.project.down()
            left = self.project.leftovers()
            if left:
                raise TopologyError(f"left after down: {', '.join(left)}")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
