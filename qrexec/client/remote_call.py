"""qrexec-client's calls into a VM: dom0 -> VM (spec §4(i)) and ``-c`` (§4(ii), old flow).

dom0 -> VM: connect to the VM's daemon socket, send EXEC_CMDLINE (JUST_EXEC with ``-e``)
with ``{0, 0}``, get ``{VM domid, port}``, listen as vchan server of that pair, exchange
HELLOs with the agent's child and run the data phase (:mod:`.caller`). With ``-W``, wait
for the daemon to close the socket (the agent's CONNECTION_TERMINATED).

``-c REQID,SRCNAME,SRCDOMID``: send EXEC_CMDLINE ``{SRCDOMID, 0}`` to the target's daemon,
then SERVICE_CONNECT ``{target domid, port}`` + REQID to the source's daemon, which hands it
to the waiting qrexec-client-vm; no data passes through us.

Blocking, no asyncio.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from qrexec.client.caller import CallerIO, caller_handshake, read_exit_code, run_caller
from qrexec.client.daemon_socket import DEFAULT_SOCKET_DIR, SOCKET_DIR_ENV, DaemonConnection
from qrexec.errors import QrexecError, UsageError
from qrexec.lazy_logging import get_logger
from qrexec.protocol.cmdline import encode_cmdline
from qrexec.protocol.constants import VCHAN_DATA_RING_SIZE, ExitCode, MsgType
from qrexec.protocol.messages import ExecRequest, ServiceConnect

log = get_logger(__name__)


#: ``-c`` names the calling VM by domain id; C's ``strtol`` base 0 reads these forms.
INT_MAX = 2**31 - 1
DOM0_NAMES = frozenset({"dom0", "@adminvm", "uuid:00000000-0000-0000-0000-000000000000"})


def _parse_domid(text: str) -> int | None:
    """``strtol(text, NULL, 0)`` with nothing left over: ``0x`` hex, leading-``0`` octal,
    else decimal; None when it is not such a number."""
    digits, base = text, 10
    if text[:2] in ("0x", "0X"):
        digits, base = text[2:], 16
    elif text.startswith("0"):
        digits, base = text, 8
    allowed = "0123456789abcdefABCDEF"[: base + (6 if base == 16 else 0)]
    if not digits or any(char not in allowed for char in digits):
        return None
    return int(digits, base)


def parse_connect_arg(value: str) -> tuple[bytes, str, int]:
    """``REQID,SRCNAME,SRCDOMID`` of ``-c``, checked as R4.3 does (spec §15.1): a usage
    error (exit 1) for an empty or over-31-byte REQID, a source naming dom0, or a SRCID
    that is 0 or not a number up to INT_MAX."""
    parts = value.split(",")
    if len(parts) != 3:
        raise UsageError(f"-c expects REQID,SRCNAME,SRCDOMID, not {value!r}")
    ident = parts[0].encode("utf-8", "surrogateescape")
    if not ident or len(ident) >= 32:
        raise UsageError("-c: the request id must have 1 to 31 bytes")
    if parts[1] in DOM0_NAMES:
        raise UsageError("-c: the source domain cannot be dom0")
    domid = _parse_domid(parts[2])
    if domid is None or domid > INT_MAX:
        raise UsageError(f"-c: {parts[2]!r} is not a domain id")
    if domid == 0:
        raise UsageError("-c: the source domain cannot be dom0 (id 0)")
    return ident, parts[1], domid


class RemoteCall:
    def __init__(self, args: argparse.Namespace, env: dict[str, str]) -> None:
        self.args = args
        self.env = env
        self.socket_dir = args.socket_dir or env.get(SOCKET_DIR_ENV) or DEFAULT_SOCKET_DIR

    def run(self) -> int:
        if self.args.connect is not None:
            return self._connect_existing()
        return self._exec()

    def _exec(self) -> int:
        from qrexec.backends.select import load_backend
        from qrexec.protocol.negotiation import own_protocol_version

        args = self.args
        own_version = own_protocol_version(self.env)
        backend = load_backend(args.transport, self.env)
        msg_type = MsgType.JUST_EXEC if args.just_exec else MsgType.EXEC_CMDLINE
        daemon = DaemonConnection.open(self.socket_dir, args.dest)
        try:
            reply = daemon.request(ExecRequest(msg_type, 0, 0, encode_cmdline(args.cmdline)))
            assert reply is not None
            listener = backend.listen(
                reply.connect_domain,
                reply.connect_port,
                read_min=VCHAN_DATA_RING_SIZE,
                write_min=VCHAN_DATA_RING_SIZE,
            )
            try:
                stream = listener.accept(timeout=args.timeout or None)
            except TimeoutError:
                raise QrexecError(
                    f"the agent of {args.dest} did not connect within {args.timeout} s"
                ) from None
            finally:
                listener.close()
            try:
                version = caller_handshake(stream, own_version)
                if args.just_exec:
                    code = read_exit_code(stream, version)
                else:
                    code = self._data_phase(stream, version)
            finally:
                stream.close()
            if args.wait:
                daemon.wait_closed()
        finally:
            daemon.close()
        return code

    def _data_phase(self, stream: Any, version: int) -> int:
        args = self.args
        prefix = args.prefix_data.encode("utf-8", "surrogateescape")
        if args.local_cmd is not None:
            import subprocess

            local = subprocess.Popen(
                ["/bin/sh", "-c", args.local_cmd], stdin=subprocess.PIPE, stdout=subprocess.PIPE
            )
            assert local.stdin is not None and local.stdout is not None
            io = CallerIO(
                stdin_fd=local.stdout.fileno(),
                stdout_fd=os.dup(local.stdin.fileno()),
                stderr_fd=2,
                prefix_data=prefix,
                filter_stderr=args.filter_stderr,
            )
            local.stdin.close()
            code = run_caller(stream, version, io)
            if not io.stdout_closed:
                os.close(io.stdout_fd)
            local.wait()
            return code
        if args.use_stdin_socket:
            io = CallerIO(stdin_fd=0, stdout_fd=0, stderr_fd=2, prefix_data=prefix)
        else:
            io = CallerIO(stdin_fd=0, stdout_fd=1, stderr_fd=2, prefix_data=prefix)
        io.filter_stdout = args.filter_stdout
        io.filter_stderr = args.filter_stderr
        return run_caller(stream, version, io)

    def _connect_existing(self) -> int:
        """``-d VM -c``: no data phase (spec §15.1). The target's socket is closed as soon
        as it answered, unless ``-W`` keeps it to wait for the connection's end."""
        args = self.args
        ident, source_name, source_id = parse_connect_arg(args.connect)
        target = DaemonConnection.open(self.socket_dir, args.dest)
        try:
            reply = target.request(
                ExecRequest(MsgType.EXEC_CMDLINE, source_id, 0, encode_cmdline(args.cmdline))
            )
            assert reply is not None
            if not args.wait:
                target.close()
            source = DaemonConnection.open(self.socket_dir, str(source_id))
            try:
                source.request(
                    ServiceConnect(reply.connect_domain, reply.connect_port, ident),
                    expect_reply=False,
                )
            finally:
                source.close()
            log.debug("connected %s to %s port %d", source_name, args.dest, reply.connect_port)
            if args.wait:
                target.wait_closed()
        finally:
            target.close()
        return ExitCode.OK
