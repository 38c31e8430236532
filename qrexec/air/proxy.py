"""``qubesair.SSHProxy``: the relay qube's transport service, one process per relayed call.

dom0 runs it in the relay qube as ``qubesair.SSHProxy+REMOTE_TARGET+SERVICE+ARG`` with the
original caller in ``QREXEC_REMOTE_DOMAIN``. It looks REMOTE_TARGET up in its configuration
(peer relay address, port, account, client key, pinned host key, and the qube's name over
there), runs ``ssh`` with an argument list and every host-key check on, sends the request line
``SOURCE TARGET SERVICE+ARG`` as the remote command, and lets stdin and stdout flow through
untouched. The peer's exit code comes back as ssh's; the far side's stderr comes back as it
is written. A transport failure — ssh's own status 255 — becomes 125 with one stderr line
naming the cause (taken from ssh's log, which is kept apart from the far side's stderr); a
refusal on the far side is the far side's 126. A remote service that itself exits 255 is
therefore seen as a transport failure too (ssh gives no way to tell them apart). It never
runs a shell and never asks anything on a terminal.

Configuration: ``--config FILE`` (JSON, written by the testbed or by hand, see
``deploy/README.md``), by default ``/etc/qubes/air/sshproxy.json``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Mapping, Sequence
from typing import IO, Any

from qrexec.air.request import (
    AirRequestError,
    RelayRequest,
    host_key_alias,
    parse_request_line,
    split_transport_argument,
)

DEFAULT_CONFIG = "/etc/qubes/air/sshproxy.json"
PROGRAM = "qubesair.SSHProxy"
#: Exit codes with their Qubes meaning.
EXIT_QREXEC_PROBLEM = 125
EXIT_REFUSED = 126
#: ssh's own failure status.
SSH_FAILED = 255


def _fail(message: str, code: int = EXIT_QREXEC_PROBLEM) -> int:
    sys.stderr.write(f"{PROGRAM}: {message}\n")
    sys.stderr.flush()
    return code


def ssh_argv(ssh: str, remote: Mapping[str, Any], request: RelayRequest, log: str) -> list[str]:
    """The ssh invocation: batch mode, pinned key, no config files, the request as command."""
    return [
        ssh,
        "-F",
        "/dev/null",
        "-T",
        "-E",
        log,
        "-o",
        "BatchMode=yes",
        "-o",
        "StrictHostKeyChecking=yes",
        "-o",
        f"UserKnownHostsFile={remote['known_hosts']}",
        "-o",
        "GlobalKnownHostsFile=/dev/null",
        "-o",
        f"HostKeyAlias={host_key_alias(str(remote['remote_host']))}",
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        f"IdentityFile={remote['key']}",
        "-o",
        f"ConnectTimeout={int(remote.get('connect_timeout', 10))}",
        "-o",
        "ServerAliveInterval=15",
        "-o",
        "ControlMaster=no",
        "-o",
        "LogLevel=ERROR",
        "-p",
        str(int(remote["port"])),
        "-l",
        str(remote["user"]),
        "--",
        str(remote["address"]),
        request.line(),
    ]


def _last_error(log_path: str) -> str:
    try:
        with open(log_path, encoding="utf-8", errors="replace") as handle:
            lines = [line.strip() for line in handle if line.strip()]
    except OSError:
        return ""
    return lines[-1] if lines else ""


def relay(config: Mapping[str, Any], argument: str, source: str) -> int:
    """Carry one call to the peer host; the exit code to give the caller."""
    try:
        parsed = split_transport_argument(argument)
    except AirRequestError as exc:
        return _fail(f"bad transport argument: {exc}")
    remote = config.get("remotes", {}).get(parsed.remote_target)
    if not isinstance(remote, Mapping):
        return _fail(f"no remote qube {parsed.remote_target!r} is configured on this relay")
    try:
        request = parse_request_line(f"{source} {remote['remote_name']} {parsed.service_call}")
    except (AirRequestError, KeyError) as exc:
        return _fail(f"cannot relay for {source!r}: {exc}")
    with tempfile.NamedTemporaryFile(prefix="sshproxy-", suffix=".log") as log:
        argv = ssh_argv(str(config.get("ssh", "ssh")), remote, request, log.name)
        try:
            proc = subprocess.Popen(argv, close_fds=True, stderr=subprocess.PIPE)
        except OSError as exc:
            return _fail(f"cannot run ssh: {exc}")

        def forward(signum: int, _frame: object) -> None:
            proc.send_signal(signum)

        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, forward)
        assert proc.stderr is not None
        copier = threading.Thread(target=copy_stderr, args=(proc.stderr,), daemon=True)
        copier.start()
        code = proc.wait()
        copier.join(timeout=5)
        if code == SSH_FAILED:
            cause = _last_error(log.name) or "the connection to the peer relay closed"
            return _fail(f"{parsed.remote_target} ({remote['remote_host']}): {cause}")
        if code < 0:
            return 128 - code
        return code


#: ssh's own notice when a connection ends, printed to stderr whatever its log settings.
_SSH_NOTICE = re.compile(rb"^Connection to \S+ closed( by remote host)?\.\r?\n?$")


def copy_stderr(source: IO[bytes]) -> None:
    """Copy the far side's stderr to ours as it comes, without ssh's own closing notice
    (a transport failure is reported once, by :func:`relay`)."""
    out = sys.stderr.buffer
    while True:
        line = source.readline(65536)
        if not line:
            return
        if not _SSH_NOTICE.match(line):
            out.write(line)
            out.flush()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: ``python -m qrexec.air.proxy [--config FILE] [ARGUMENT]``."""
    args = list(sys.argv[1:] if argv is None else argv)
    config_path = DEFAULT_CONFIG
    if len(args) >= 2 and args[0] == "--config":
        config_path, args = args[1], args[2:]
    argument = os.environ.get("QREXEC_SERVICE_ARGUMENT") or (args[0] if args else "")
    source = os.environ.get("QREXEC_REMOTE_DOMAIN", "")
    try:
        with open(config_path, encoding="utf-8") as handle:
            config = json.load(handle)
    except (OSError, ValueError) as exc:
        return _fail(f"cannot read {config_path}: {exc}")
    if not isinstance(config, dict):
        return _fail(f"{config_path}: expected a JSON object")
    return relay(config, argument, source)


if __name__ == "__main__":
    sys.exit(main())
