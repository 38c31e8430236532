"""What the two call-latency benches share: our stack and Qubes' C stack side by side.

``bench_calls.py`` (dom0 -> VM) and ``bench_vm_calls.py`` (VM -> VM) run the same calls
through our programs, through the in-process client (:mod:`qrexec.client.api`) and through
Qubes' C programs (built by :func:`qrexec.sim.cpeer.build`), all on the unix-socket vchan in
a temporary folder, and compare medians measured in the same run, interleaved so machine
noise hits every variant alike.

The C agent switches users through PAM when it runs as root and only runs calls for its own
user otherwise, so as root it runs in a user namespace mapped to ``nobody``; so does ours,
so that both run ``USER:cmd`` as ``/bin/sh -c`` (a root agent of either would start a login
shell through PAM, which is not what these benches compare). The C daemon
asks the policy daemon at the fixed path ``/run/qubes/policy.sock``; as root it runs in a
private mount namespace where that path leads to this bench's policy daemon (nothing on the
host changes). Every process started is tracked by pid and stopped at the end.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import pwd
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import qrexec
from qrexec.sim import cpeer, processes
from qrexec.sim.testbed import clean_environment

NAMESPACE_USER = "nobody"
#: The policy socket path compiled into the C daemon.
C_POLICY_SOCKET = "/run/qubes/policy.sock"


def install_mode() -> str:
    """``editable`` or ``regular`` install of the package these benches import, and where."""
    where = os.path.dirname(qrexec.__file__)
    try:
        dist = importlib.metadata.distribution("qrexec-py")
    except importlib.metadata.PackageNotFoundError:
        return f"not installed (imported from {where})"
    raw = dist.read_text("direct_url.json")
    editable = bool(raw and json.loads(raw).get("dir_info", {}).get("editable"))
    return f"{'editable' if editable else 'regular'} install (qrexec from {where})"


def script(name: str) -> str:
    """A console script of this venv (beside the interpreter), else from PATH."""
    path = Path(sys.executable).parent / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if found is None:
        raise SystemExit(f"{name} is not installed (pip install .)")
    return found


#: What pip writes for a ``[project.scripts]`` entry point (our per-call clients are plain
#: scripts instead, see ``scripts/``); the benches time one to report its cost apart.
PIP_WRAPPER = """#!{python}
# -*- coding: utf-8 -*-
import re
import sys
from {module} import main
if __name__ == '__main__':
    sys.argv[0] = re.sub(r'(-script\\.pyw|\\.exe)?$', '', sys.argv[0])
    sys.exit(main())
"""


def pip_wrapper(folder: Path, name: str, module: str) -> str:
    """Write a pip-style entry-point wrapper for ``module:main`` into ``folder``."""
    path = folder / name
    path.write_text(PIP_WRAPPER.format(python=sys.executable, module=module))
    path.chmod(0o755)
    return str(path)


def c_bin() -> Path:
    """The C programs' bin folder (:func:`qrexec.sim.cpeer.source_dir` finds the source)."""
    return cpeer.build()


def user_namespace() -> list[str]:
    """Prefix running a VM-side C program as an ordinary user (see module docstring)."""
    if os.geteuid() != 0:
        return []
    entry = pwd.getpwnam(NAMESPACE_USER)
    return [
        "unshare",
        "--user",
        f"--map-user={entry.pw_uid}",
        f"--map-group={entry.pw_gid}",
    ]


def c_user() -> str:
    """The user the C agent runs calls as."""
    return NAMESPACE_USER if os.geteuid() == 0 else pwd.getpwuid(os.getuid()).pw_name


def policy_namespace(policy_socket: Path) -> list[str] | None:
    """Prefix making the C daemon's fixed policy socket path lead to ``policy_socket``;
    None when that needs privileges we do not have."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return None
    setup = (
        'mount -t tmpfs bench /run && mkdir -p /run/qubes && ln -s "$1" '
        f'{C_POLICY_SOCKET} && shift && exec "$@"'
    )
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", setup, "sh",
            str(policy_socket)]  # fmt: skip


def environment(base: Path, domid: int, extra: Mapping[str, str] = ()) -> dict[str, str]:
    env = clean_environment()
    env.update(
        QREXEC_TRANSPORT="socket",
        VCHAN_SOCKET_DIR=str(base / "vchan"),
        VCHAN_DOMAIN=str(domid),
        QREXEC_DAEMON_SOCKET_DIR=str(base / "qubes"),
    )
    env.update(extra)
    return env


class Stack:
    """dom0 and VMs of one implementation in one folder."""

    def __init__(self, base: Path, impl: str, bindir: Path | None = None) -> None:
        self.base = base
        self.impl = impl
        self.bindir = bindir
        self.records: list[processes.ProcessRecord] = []
        for sub in ("vchan", "qubes", "logs", "policy.d"):
            (base / sub).mkdir(parents=True, exist_ok=True)

    @property
    def user(self) -> str:
        """Both agents run as the same ordinary user (no login shell, no PAM): fair."""
        return c_user()

    def spawn(self, role: str, name: str, argv: list[str], env: dict[str, str]) -> None:
        record, _ = processes.spawn(role, name, argv, env, self.base / "logs" / f"{role}.{name}")
        self.records.append(record)

    def wait(self, path: Path, what: str) -> None:
        processes.wait_for(path.exists, 30.0, watch=self.records, what=what)

    def dom0_env(self) -> dict[str, str]:
        return environment(
            self.base,
            0,
            {
                "QREXEC_POLICY_SOCKET": str(self.base / "policy.sock"),
                "QREXEC_POLICY_PATH": str(self.base / "policy.d"),
                "QREXEC_SYSTEM_INFO": str(self.base / "system-info.json"),
            },
        )

    def agent_socket(self, name: str) -> Path:
        return self.base / f"agent.{name}.sock"

    def vm_env(self, name: str, domid: int) -> dict[str, str]:
        root = self.base / "roots" / name
        extra = {"QREXEC_AGENT_SOCKET": str(self.agent_socket(name))}
        if self.impl == "c":
            # The C agent has no domain root: absolute paths into the VM's folder.
            extra["QREXEC_SERVICE_PATH"] = str(root / "etc/qubes-rpc")
            extra["QUBES_RPC_CONFIG_PATH"] = str(root / "etc/qubes/rpc-config")
        else:
            extra["QREXEC_DOMAIN_ROOT"] = str(root)
        return environment(self.base, domid, extra)

    def start_policy(self, policy: str, vms: Sequence[str]) -> None:
        (self.base / "policy.d" / "30-bench.policy").write_text(policy)
        domains: dict[str, dict[str, str]] = {"dom0": {"type": "AdminVM", "power_state": "Running"}}
        for domid, name in enumerate(vms, 1):
            domains[name] = {"uuid": uuid(domid), "type": "AppVM", "power_state": "Running"}
        (self.base / "system-info.json").write_text(json.dumps({"domains": domains}))
        argv = [script("qrexec-policy-daemon"), "--eval-socket-path", "", "--gui-socket-path",
                "", "-q", "--socket-path", str(self.base / "policy.sock")]  # fmt: skip
        self.spawn("policy", "dom0", argv, self.dom0_env())
        self.wait(self.base / "policy.sock", "the policy daemon")

    def start_vm(self, name: str, domid: int, services: Mapping[str, str] = ()) -> None:
        root = self.base / "roots" / name
        (root / "etc/qubes-rpc").mkdir(parents=True, exist_ok=True)
        (root / "etc/qubes/rpc-config").mkdir(parents=True, exist_ok=True)
        for service, text in dict(services).items():
            path = root / "etc/qubes-rpc" / service
            path.write_text(text)
            path.chmod(0o755)
        sock = str(self.agent_socket(name))
        daemon_args = ["-u", uuid(domid), str(domid), name, self.user]
        if self.impl == "c":
            assert self.bindir is not None
            agent = [*user_namespace(), str(self.bindir / "qrexec-agent"), "-S", "-a", sock]
            prefix = policy_namespace(self.base / "policy.sock") or []
            daemon = [*prefix, str(self.bindir / "qrexec-daemon"), "-D",
                      f"--socket-dir={self.base / 'qubes'}",
                      f"--policy-program={script('qrexec-policy-exec')}", *daemon_args]  # fmt: skip
        else:
            agent = [*user_namespace(), script("qrexec-agent"), "--domain-root", str(root),
                     "--agent-socket", sock]  # fmt: skip
            daemon = [script("qrexec-daemon"), "--direct", "-q", *daemon_args]
        self.spawn("agent", name, agent, self.vm_env(name, domid))
        self.spawn("daemon", name, daemon, self.dom0_env())
        self.wait(self.base / "qubes" / f"qrexec.{domid}", f"{self.impl} {name} to connect")
        self.wait(self.agent_socket(name), f"{self.impl} {name}'s trigger socket")

    def stop(self) -> None:
        processes.stop(self.records)


def uuid(domid: int) -> str:
    return f"00000000-0000-4000-8000-{domid:012d}"


def run_timed(
    argv: Sequence[str], env: Mapping[str, str] | None, data: bytes = b"", expect: bytes = b""
) -> float:
    start = time.perf_counter()
    done = subprocess.run(list(argv), input=data, capture_output=True, env=env, check=False)
    elapsed = time.perf_counter() - start
    if done.returncode != 0 or done.stdout != expect:
        raise SystemExit(
            f"{' '.join(argv)[:200]} failed ({done.returncode}, out {done.stdout[:80]!r}): "
            f"{done.stderr.decode(errors='replace')[-500:]}"
        )
    return elapsed


def measure(variants: Mapping[str, Callable[[], float]], rounds: int) -> dict[str, float]:
    """Median milliseconds of each variant, run round-robin ``rounds`` times."""
    for run in variants.values():  # warm caches, connections, the policy daemon
        for _ in range(3):
            run()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, run in variants.items():
            times[name].append(run())
    return {name: statistics.median(values) * 1000 for name, values in times.items()}


def report(medians: Mapping[str, float], ratios: Sequence[tuple[str, str, str]]) -> None:
    width = max(len(name) for name in medians)
    for name, value in medians.items():
        print(f"  {name:<{width}}  {value:8.2f} ms")
    for label, top, bottom in ratios:
        if top in medians and bottom in medians:
            print(f"  ratio {label:<52} {medians[top] / medians[bottom]:6.2f}")
