"""OpenSSH material of a multi-host testbed: keys, sshd_config, forced commands, pinned hosts.

Each host's relay qube has an ``sshd`` (the peer hosts' way in) and a client key (its way out).
Nothing is trusted on first use: every known_hosts file is written here with the peer's host
key under a fixed alias, and every authorized key carries ``restrict`` and a forced command
(:mod:`.entry`) bound to one peer host, so a key can only ever run that entry with that peer's
name. This module writes files and runs ``ssh-keygen``; it starts no daemon.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from qrexec.air.request import host_key_alias
from qrexec.errors import QrexecError


class SshSetupError(QrexecError):
    """An OpenSSH program is missing or failed while preparing a host."""


@dataclass(frozen=True)
class Endpoint:
    """Where a host's relay sshd listens, and how peers reach it."""

    address: str
    port: int
    user: str


def find_openssh(program: str) -> str:
    """Absolute path of ``ssh``, ``sshd`` or ``ssh-keygen`` (sshd refuses a relative argv[0])."""
    for folder in (*os.environ.get("PATH", "").split(os.pathsep), "/usr/sbin", "/usr/bin"):
        candidate = Path(folder or ".") / program
        try:
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return str(candidate.resolve())
        except OSError:
            continue  # a PATH entry we may not look into
    raise SshSetupError(
        f"{program} is not installed (Debian: apt-get install openssh-client openssh-server)"
    )


def generate_key(path: Path, comment: str) -> str:
    """An ed25519 key pair at ``path`` (private, mode 0600) and ``path.pub``; the public line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in (path, path.with_name(path.name + ".pub")):
        stale.unlink(missing_ok=True)
    result = subprocess.run(
        [
            find_openssh("ssh-keygen"),
            "-q",
            "-t",
            "ed25519",
            "-N",
            "",
            "-C",
            comment,
            "-f",
            str(path),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise SshSetupError(f"ssh-keygen failed for {path}: {result.stderr.strip()}")
    return path.with_name(path.name + ".pub").read_text().strip()


def entry_command(peer: str, config: Path, python: str = sys.executable) -> list[str]:
    """The forced command for one peer's key: our entry, with the peer's name bound in
    (``python``: the interpreter where sshd runs, e.g. a container's own)."""
    return [python, "-m", "qrexec.air.entry", "--peer", peer, "--config", str(config)]


def authorized_key_line(
    peer: str, public_key: str, config: Path, python: str = sys.executable
) -> str:
    """``restrict,command="ENTRY --peer PEER" KEY``: no shell, pty, forwarding or agent."""
    command = shlex.join(entry_command(peer, config, python))
    if '"' in command or "\n" in command:
        raise SshSetupError(f"cannot quote the entry command {command!r} for authorized_keys")
    return f'restrict,command="{command}" {public_key}'


def known_hosts_line(host: str, host_public_key: str) -> str:
    """One pinned host key, under the host's alias (the ssh client uses ``HostKeyAlias``)."""
    key_type, key_data = host_public_key.split()[:2]
    return f"{host_key_alias(host)} {key_type} {key_data}"


def sshd_config(
    *, listen: Endpoint, host_key: Path, authorized_keys: Path, pid_file: Path, max_startups: int
) -> str:
    """An sshd_config that serves the forced commands only, for one account, with keys only."""
    address = f"[{listen.address}]" if ":" in listen.address else listen.address
    lines = [
        f"ListenAddress {address}:{listen.port}",
        f"HostKey {host_key}",
        f"PidFile {pid_file}",
        f"AuthorizedKeysFile {authorized_keys}",
        f"AllowUsers {listen.user}",
        "AuthenticationMethods publickey",
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "PermitRootLogin forced-commands-only",
        "PermitUserEnvironment no",
        "PermitTTY no",
        "AllowTcpForwarding no",
        "AllowAgentForwarding no",
        "AllowStreamLocalForwarding no",
        "X11Forwarding no",
        "PermitTunnel no",
        "UsePAM no",
        # The testbed's files live in temporary folders other accounts may traverse.
        "StrictModes no",
        "UseDNS no",
        "PrintMotd no",
        "LogLevel INFO",
        f"MaxStartups {max_startups}",
        "MaxSessions 1",
        "ClientAliveInterval 15",
        "ClientAliveCountMax 4",
    ]
    return "\n".join(lines) + "\n"


def proxy_config(remotes: dict[str, dict[str, object]]) -> str:
    """The proxy's configuration: one entry per RemoteVM this relay carries traffic for."""
    return json.dumps({"ssh": find_openssh("ssh"), "remotes": remotes}, indent=1, sort_keys=True)


def write_private(path: Path, text: str) -> None:
    """Write a file readable by its owner only (keys, configs naming keys)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
