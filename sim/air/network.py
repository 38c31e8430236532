"""Where each host's relay sshd listens: its own network namespace (root) or a loopback port.

As root, every host gets a network namespace with one veth link to a switch namespace (a
bridge), a link-local address (169.254.N.H, never routed, nothing outside the namespaces
sees it) and its own sshd bound only there; the host's agents run inside its namespace, so
the relay's ssh client leaves through that link. Without root there are no namespaces: each
host's sshd listens on its own loopback port, and every process shares the machine's network
(say so: process mode is no isolation boundary between hosts either way, only the sshd
binding differs). Runs ``ip``; removes exactly the namespaces it made.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field

from qrexec.errors import QrexecError

NETNS = "netns"
LOOPBACK = "loopback"


class NetworkError(QrexecError):
    """Namespaces could not be made (or the mode is not possible here)."""


def default_mode() -> str:
    """Namespaces as root (when ``ip`` exists), loopback ports otherwise."""
    return NETNS if os.geteuid() == 0 and shutil.which("ip") else LOOPBACK


def free_loopback_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise NetworkError(f"ip {' '.join(args)}: {result.stderr.strip()}")


@dataclass
class HostNetwork:
    """One host's place on the network."""

    address: str
    port: int
    #: Command prefix that runs a program in the host's namespace (empty for loopback).
    wrap: list[str] = field(default_factory=list)
    netns: str | None = None


@dataclass
class AirNetwork:
    """The namespaces (or ports) of a multi-host testbed."""

    mode: str
    hosts: dict[str, HostNetwork]
    switch: str | None = None

    def namespaces(self) -> list[str]:
        """Every namespace this network made (hosts first, the switch last)."""
        found = [h.netns for h in self.hosts.values() if h.netns]
        return found + ([self.switch] if self.switch else [])


def _token(run_dir: str) -> str:
    return hashlib.sha256(run_dir.encode()).hexdigest()[:6]


def make_network(run_dir: str, host_names: Sequence[str], mode: str) -> AirNetwork:
    """Build the network for ``host_names``; undone by :func:`remove_network`."""
    if mode == LOOPBACK:
        return AirNetwork(
            LOOPBACK, {name: HostNetwork("127.0.0.1", free_loopback_port()) for name in host_names}
        )
    if mode != NETNS:
        raise NetworkError(f"unknown network mode {mode!r} (netns or loopback)")
    if os.geteuid() != 0:
        raise NetworkError("network namespaces need root; use the loopback mode")
    token = _token(run_dir)
    # 169.254.N.0/24 link-local, N from the run directory (never 169: 169.254.169.254 is
    # a metadata address on clouds; never 0 or 255).
    subnet = 1 + int(token, 16) % 253
    subnet = subnet + 1 if subnet == 169 else subnet
    network = AirNetwork(NETNS, {}, switch=f"qair-{token}-sw")
    try:
        _ip("netns", "add", network.switch or "")
        _ip("-n", network.switch or "", "link", "set", "lo", "up")
        _ip("-n", network.switch or "", "link", "add", "br0", "type", "bridge")
        _ip("-n", network.switch or "", "link", "set", "br0", "up")
        for index, name in enumerate(host_names, start=1):
            netns = f"qair-{token}-h{index}"
            network.hosts[name] = HostNetwork(
                f"169.254.{subnet}.{index}", 22, ["ip", "netns", "exec", netns], netns
            )
            _ip("netns", "add", netns)
            _ip("-n", netns, "link", "set", "lo", "up")
            peer = f"h{index}"
            _ip("-n", netns, "link", "add", "eth0", "type", "veth", "peer", "name", peer,
                "netns", network.switch or "")  # fmt: skip
            _ip("-n", netns, "addr", "add", f"169.254.{subnet}.{index}/24", "dev", "eth0")
            _ip("-n", netns, "link", "set", "eth0", "up")
            _ip("-n", network.switch or "", "link", "set", peer, "master", "br0")
            _ip("-n", network.switch or "", "link", "set", peer, "up")
    except BaseException:
        remove_network(network)
        raise
    return network


def remove_network(network: AirNetwork) -> None:
    """Delete the namespaces (their veth links go with them); missing ones are fine."""
    for netns in network.namespaces():
        subprocess.run(["ip", "netns", "del", netns], capture_output=True, check=False)
