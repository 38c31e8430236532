"""A testbed's run directory: its layout, and the state file that lists what it started.

Everything a running testbed owns lives under one directory, so several testbeds run side
by side by using different directories. The state file (JSON) lists every process with
pid and start time, and every domain with its id, uuid and power state; ``up``, the qubesd
stand-in (which starts domains on demand) and ``down`` all update it under an exclusive
``flock``, each with a read-modify-write.

Unix socket paths are limited to 107 bytes, and the longest socket the testbed makes is a
daemon's ``qrexec.uuid:<uuid>`` link, so the run directory's own path must be short:
:class:`RunDir` refuses a path that would not fit, naming the limit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from qrexec.sim.processes import ProcessRecord
from qrexec.sim.topology import Domain, FileSpec, PolicySpec, ServiceSpec, Topology

#: Environment variable naming the run directory (like the --run-dir flag).
RUN_DIR_ENV = "QREXEC_SIM_RUN_DIR"
#: Longest run directory path: leaves room for the longest socket path below it.
MAX_RUN_DIR_LEN = 48


def default_run_dir() -> Path:
    """``$QREXEC_SIM_RUN_DIR``, else a short per-user folder in /tmp."""
    env = os.environ.get(RUN_DIR_ENV)
    return Path(env) if env else Path(f"/tmp/qrexec-sim-{os.getuid()}")


@dataclasses.dataclass
class DomainState:
    """A domain as the running testbed knows it (disposables come and go)."""

    name: str
    id: int
    uuid: str
    running: bool
    disposable: bool = False
    template: str | None = None


@dataclasses.dataclass
class State:
    """Contents of the state file."""

    processes: list[ProcessRecord] = dataclasses.field(default_factory=list)
    domains: dict[str, DomainState] = dataclasses.field(default_factory=dict)
    #: The account that runs agents, i.e. every domain's default user in process mode.
    agent_user: str = "user"
    next_dispvm_id: int = 0

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> State:
        return cls(
            processes=[ProcessRecord(**p) for p in data.get("processes", [])],
            domains={k: DomainState(**v) for k, v in data.get("domains", {}).items()},
            agent_user=data.get("agent_user", "user"),
            next_dispvm_id=data.get("next_dispvm_id", 0),
        )


class RunDir:
    """Paths of one testbed's run directory."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).absolute()
        if len(str(self.path)) > MAX_RUN_DIR_LEN:
            raise ValueError(
                f"run directory {self.path} is too long for unix socket paths below it "
                f"(at most {MAX_RUN_DIR_LEN} characters); choose a shorter one"
            )

    # Layout -----------------------------------------------------------------------------
    @property
    def state_file(self) -> Path:
        return self.path / "state.json"

    @property
    def topology_file(self) -> Path:
        return self.path / "topology.json"

    @property
    def vchan_dir(self) -> Path:
        """VCHAN_SOCKET_DIR of every domain (isolated layout: one folder per pair)."""
        return self.path / "vchan"

    @property
    def daemon_socket_dir(self) -> Path:
        """dom0's /var/run/qubes: the qrexec-daemon sockets."""
        return self.path / "qubes"

    @property
    def policy_socket(self) -> Path:
        return self.path / "policy.sock"

    @property
    def qubesd_socket(self) -> Path:
        return self.path / "qubesd.sock"

    @property
    def system_info_file(self) -> Path:
        return self.path / "system-info.json"

    @property
    def audit_log(self) -> Path:
        return self.path / "audit.log"

    @property
    def ask_script(self) -> Path:
        """The scripted prompter's rules (answers to ``ask``)."""
        return self.path / "ask-answers"

    @property
    def log_dir(self) -> Path:
        return self.path / "logs"

    def root(self, domain: str) -> Path:
        """The domain's file system."""
        return self.path / "d" / domain

    def agent_socket(self, domain: str) -> Path:
        """The domain's qrexec-agent trigger socket (its /var/run/qubes/qrexec-agent)."""
        return self.root(domain) / "var/run/qubes/qrexec-agent"

    def daemon_socket(self, domain: str) -> Path:
        """The name link of the domain's qrexec-daemon socket."""
        return self.daemon_socket_dir / f"qrexec.{domain}"

    def log_file(self, role: str, domain: str) -> Path:
        return self.log_dir / f"{role}.{domain}.log"

    # State ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def locked_state(self) -> Iterator[State]:
        """Read the state under an exclusive lock; changes are written back on exit."""
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.path / "state.lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            state = self.read_state()
            yield state
            tmp = self.state_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(state.to_json(), indent=1))
            os.replace(tmp, self.state_file)

    def read_state(self) -> State:
        """The current state (empty when nothing was ever started here)."""
        try:
            return State.from_json(json.loads(self.state_file.read_text()))
        except FileNotFoundError:
            return State()

    # Topology ---------------------------------------------------------------------------
    def save_topology(self, topology: Topology) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        self.topology_file.write_text(json.dumps(dataclasses.asdict(topology), indent=1))

    def load_topology(self) -> Topology:
        data = json.loads(self.topology_file.read_text())
        domains = []
        for raw in data["domains"]:
            raw["services"] = [ServiceSpec(**s) for s in raw["services"]]
            raw["files"] = [FileSpec(**f) for f in raw["files"]]
            domains.append(Domain(**raw))
        data["domains"] = domains
        data["policies"] = [PolicySpec(**p) for p in data["policies"]]
        return Topology(**data)
