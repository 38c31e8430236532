"""The forced command of a relay qube's sshd: one relayed call coming in from a peer host.

Installed as ``restrict,command="… --peer PEER --config FILE"`` for each peer host's key, so
the peer's name is bound to the key, not taken from anything the peer sends. The request
(``SSH_ORIGINAL_COMMAND``: ``SOURCE TARGET SERVICE+ARG``) is read as data and checked word by
word; SOURCE must be one of the qubes this host knows as that peer's (a RemoteVM whose
``remote_host`` is PEER), and is replaced by the name this host knows it by. Then it execs
``qrexec-client-vm --source-qube=LOCAL_NAME TARGET SERVICE+ARG`` with an argument list, so this
host's dom0 decides the call as coming from that RemoteVM. Anything refused exits 126 with one
line on stderr, before any qrexec call is made.

Configuration (JSON, written by the testbed): ``client_vm`` (the program), ``agent_socket``
(this relay's trigger socket), ``env`` (the relay's qrexec environment) and ``peers``
(peer → {their qube name → our local name}).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from qrexec.air.request import AirRequestError, parse_request_line

EXIT_REFUSED = 126
EXIT_QREXEC_PROBLEM = 125


def _refuse(message: str, code: int = EXIT_REFUSED) -> int:
    sys.stderr.write(f"qubes-air entry: {message}\n")
    sys.stderr.flush()
    return code


def client_vm_argv(config: Mapping[str, Any], source: str, target: str, call: str) -> list[str]:
    """qrexec-client-vm, through this relay's agent, on behalf of ``source``."""
    return [
        str(config["client_vm"]),
        "-a",
        str(config["agent_socket"]),
        f"--source-qube={source}",
        target,
        call,
    ]


def prepare(config: Mapping[str, Any], peer: str, command: str) -> list[str] | int:
    """The argv to exec for ``peer``'s request line, or the exit code of a refusal."""
    try:
        request = parse_request_line(command)
    except AirRequestError as exc:
        return _refuse(f"request from {peer} refused: {exc}")
    claimable = config.get("peers", {}).get(peer)
    if not isinstance(claimable, Mapping):
        return _refuse(f"{peer} is not a peer of this relay")
    local_source = claimable.get(request.source)
    if not isinstance(local_source, str):
        return _refuse(f"{peer} may not call on behalf of {request.source!r}")
    return client_vm_argv(config, local_source, request.target, request.service_call)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m qrexec.air.entry --peer PEER --config FILE`` (sshd's forced command)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 4 or args[0] != "--peer" or args[2] != "--config":
        return _refuse("usage: entry --peer PEER --config FILE", EXIT_QREXEC_PROBLEM)
    peer, config_path = args[1], args[3]
    try:
        with open(config_path, encoding="utf-8") as handle:
            config = json.load(handle)
    except (OSError, ValueError) as exc:
        return _refuse(f"cannot read {config_path}: {exc}", EXIT_QREXEC_PROBLEM)
    result = prepare(config, peer, os.environ.get("SSH_ORIGINAL_COMMAND", ""))
    if isinstance(result, int):
        return result
    env = {str(k): str(v) for k, v in config.get("env", {}).items()}
    try:
        os.execve(result[0], result, env)
    except OSError as exc:
        return _refuse(f"cannot run {result[0]}: {exc}", EXIT_QREXEC_PROBLEM)
    return EXIT_QREXEC_PROBLEM  # not reached: execve returned without raising


if __name__ == "__main__":
    sys.exit(main())
