"""The settings of one qrexec-daemon, from its command line and environment (:mod:`.cli`).

A plain value shared by the daemon's modules; it does nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

from qrexec.protocol.constants import MAX_DATA_PORTS


@dataclass
class DaemonConfig:
    """Settings of one daemon (command line and environment, see :mod:`.cli`)."""

    domid: int
    name: str
    default_user: str = "user"
    uuid: str | None = None
    socket_dir: str = "/var/run/qubes"
    own_version: int = 4
    startup_timeout: float = 60.0
    policy_program: str = "/usr/bin/qrexec-policy-exec"
    policy_socket: str = "/run/qubes/policy.sock"
    qubesd_socket: str = "/run/qubesd.sock"
    #: Most clients connected to the daemon socket at once.
    max_clients: int = 256
    #: Most data connections (reserved ports) of this VM at once.
    max_connections: int = MAX_DATA_PORTS
    #: Most bytes of client messages held by the daemon at once (per VM).
    max_buffered: int = 4 * 1024 * 1024
    #: Deadline of the VM's HELLO on a dom0 call's data vchan (spec: dom0's 5 s).
    handshake_timeout: float = 5.0
