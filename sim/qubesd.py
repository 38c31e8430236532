"""A stand-in for qubesd's admin API, as far as qrexec uses it (spec §14).

``qrexec-daemon`` asks qubesd to start a stopped target (``autostart``), to create a
disposable for an ``@dispvm:NAME`` target and to kill that disposable after the call;
``qrexec-client -k`` kills its destination. This server speaks the same socket format on the
testbed's ``qubesd.sock`` and carries the calls out on the testbed: a started domain gets
its agent and daemon, a disposable is a fresh domain (new name, id and uuid, files copied from
its template) that is removed when it is killed.

Requests are read to EOF (the caller shuts down its writing side) and capped at 64 KiB;
anything malformed gets qubesd's error answer, never a crash. Only the three methods above
exist; everything else is refused as qubesd refuses an unknown method.

Run as ``python -m qrexec.sim.qubesd --run-dir DIR`` (``qrexec-sim up`` does that).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import signal
import socket
import socketserver
import sys
import threading
import time
from types import FrameType
from typing import Any, Protocol

from qrexec.listening import ACCEPT_PAUSE, RESOURCE_ERRNOS, RateLimitedWarning, listen_backlog
from qrexec.sim.rundir import DomainState
from qrexec.sim.testbed import Testbed, TestbedError

log = logging.getLogger("qrexec.sim.qubesd")

MAX_REQUEST = 65536
#: A caller has this long to send its whole request (qrexec-daemon sends it at once).
REQUEST_TIMEOUT = 10.0
#: Most callers without a complete request at once.
MAX_IDLE_CALLERS = 64
METHODS = ("admin.vm.Start", "admin.vm.CreateDisposable", "admin.vm.Kill")


class AdminError(Exception):
    """A refused admin call; ``kind`` is the qubesd exception class name sent back."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclasses.dataclass(frozen=True)
class AdminRequest:
    """One parsed admin call: ``METHOD[+ARG] SOURCE TYPE DEST`` NUL payload."""

    method: str
    argument: str
    source: str
    dest: str
    payload: bytes


def parse_request(data: bytes) -> AdminRequest:
    """Parse and validate an admin request; :class:`AdminError` names what was wrong."""
    header, sep, payload = data.partition(b"\0")
    if not sep:
        raise AdminError("ProtocolError", "request header is not NUL-terminated")
    try:
        text = header.decode("ascii")
    except UnicodeDecodeError as exc:
        raise AdminError("ProtocolError", "request header is not ASCII") from exc
    parts = text.split(" ")
    if len(parts) != 4:
        raise AdminError("ProtocolError", f"expected 4 header fields, got {len(parts)}")
    method_arg, source, dest_type, dest = parts
    method, _, argument = method_arg.partition("+")
    if method not in METHODS:
        raise AdminError("ProtocolError", f"method {method!r} is not served here")
    if dest_type not in ("name", "keyword"):
        raise AdminError("ProtocolError", f"destination type {dest_type!r} is invalid")
    if dest_type == "keyword":
        dest = "@" + dest
    if not dest or len(dest) > 80 or not all(c.isalnum() or c in "-_.:@" for c in dest):
        raise AdminError("ProtocolError", f"destination {dest!r} is invalid")
    return AdminRequest(method, argument, source, dest, payload)


class DomainControl(Protocol):
    """What the admin API needs from a testbed (processes or containers)."""

    def domain_states(self) -> dict[str, DomainState]: ...
    def start_domain(self, name: str) -> None: ...
    def create_disposable(self, template: str) -> DomainState: ...
    def stop_domain(self, name: str) -> None: ...


class AdminApi:
    """The three calls, carried out on one testbed."""

    def __init__(self, testbed: DomainControl) -> None:
        self.testbed = testbed
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    def _lock(self, name: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(name, threading.Lock())

    def _resolve(self, dest: str) -> str:
        """A domain name from a name or ``uuid:UUID`` destination."""
        domains = self.testbed.domain_states()
        if dest.startswith("uuid:"):
            for dom in domains.values():
                if dom.uuid == dest[5:]:
                    return dom.name
        elif dest in domains:
            return dest
        raise AdminError("QubesVMNotFoundError", f"no such domain: {dest!r}")

    def handle(self, request: AdminRequest) -> bytes:
        """Carry out a request; the answer payload on success."""
        if request.source != "dom0":
            raise AdminError("PermissionDenied", "only dom0 may call the admin API here")
        name = self._resolve(request.dest)
        if name == "dom0":
            raise AdminError("QubesException", "dom0 cannot be started, killed or cloned")
        if request.method == "admin.vm.Start":
            with self._lock(name):
                if self.testbed.domain_states()[name].running:
                    raise AdminError("QubesVMNotHaltedError", f"domain {name} is running")
                log.info("starting %s on demand", name)
                self.testbed.start_domain(name)
            return b""
        if request.method == "admin.vm.CreateDisposable":
            try:
                disp = self.testbed.create_disposable(name)
            except TestbedError as exc:
                raise AdminError("QubesException", str(exc)) from exc
            log.info("created disposable %s (uuid %s) from %s", disp.name, disp.uuid, name)
            if request.payload == b"uuid":
                return f"uuid:{disp.uuid}".encode()
            return disp.name.encode()
        # admin.vm.Kill
        with self._lock(name):
            if not self.testbed.domain_states()[name].running:
                raise AdminError("QubesVMNotStartedError", f"domain {name} is not running")
            log.info("killing %s", name)
            self.testbed.stop_domain(name)
        return b""


def call_admin(
    socket_path: str, method: str, dest: str, payload: bytes = b"", timeout: float = 120.0
) -> tuple[bool, bytes]:
    """Make one admin call as qrexec-daemon does (spec §14): (success, answer)."""
    kind = "keyword" if dest.startswith("@") else "name"
    request = f"{method} dom0 {kind} {dest.removeprefix('@')}".encode() + b"\0" + payload
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(socket_path)
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    code, _, rest = answer.partition(b"\0")
    return code == b"0", rest


class _Handler(socketserver.StreamRequestHandler):
    server: AdminServer

    def handle(self) -> None:
        data = b""
        self.connection.settimeout(self.server.request_timeout)
        try:
            while len(data) <= MAX_REQUEST:
                chunk = self.connection.recv(65536)
                if not chunk:
                    break
                data += chunk
        except OSError as exc:
            log.info("dropping a caller before its request was complete: %s", exc or "timeout")
            return
        finally:
            dropped = not self.server.request_complete(self.connection)
        if dropped:
            return
        try:
            if len(data) > MAX_REQUEST:
                raise AdminError("ProtocolError", f"request longer than {MAX_REQUEST} bytes")
            request = parse_request(data)
            answer = b"0\0" + self.server.api.handle(request)
        except AdminError as exc:
            log.info("refused: %s: %s", exc.kind, exc)
            answer = b"2\0" + exc.kind.encode() + b"\0\0" + str(exc).encode() + b"\0"
        except Exception as exc:
            log.exception("admin call failed")
            answer = b"2\0QubesException\0\0" + str(exc).encode() + b"\0"
        try:
            self.connection.sendall(answer)
        except OSError as exc:
            log.info("caller went away before the answer: %s", exc)


class AdminServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """Thread per caller, guarded as our other listeners are (:mod:`qrexec.listening`):
    a read deadline, at most ``max_idle`` callers without a complete request (the oldest
    is dropped for a newcomer), a pause with one rate-limited warning when accepting runs
    out of descriptors, and the kernel's full backlog."""

    daemon_threads = True

    def __init__(
        self,
        path: str,
        api: AdminApi,
        *,
        max_idle: int = MAX_IDLE_CALLERS,
        request_timeout: float = REQUEST_TIMEOUT,
    ) -> None:
        self.api = api
        self.max_idle = max_idle
        self.request_timeout = request_timeout
        self.request_queue_size = listen_backlog()
        self._idle: dict[socket.socket, None] = {}
        self._dropped: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._exhausted = RateLimitedWarning(log)
        self._drops = RateLimitedWarning(log)
        super().__init__(path, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        # Counted here, in accept order (handler threads start in any order).
        self.track_idle(request)
        super().process_request(request, client_address)

    def track_idle(self, conn: socket.socket) -> None:
        with self._lock:
            self._idle[conn] = None
            if len(self._idle) > self.max_idle:
                self._drop_oldest_locked()

    def request_complete(self, conn: socket.socket) -> bool:
        """Leave the idle set; False when the connection was dropped meanwhile."""
        with self._lock:
            self._idle.pop(conn, None)
            if conn in self._dropped:
                self._dropped.discard(conn)
                return False
            return True

    def _drop_oldest_locked(self) -> None:
        if not self._idle:
            return
        oldest = next(iter(self._idle))
        del self._idle[oldest]
        self._dropped.add(oldest)
        self._drops.warning("dropping the oldest caller without a request (%d idle)", self.max_idle)
        # Its handler's recv returns at once; the handler then ends without answering.
        with contextlib.suppress(OSError):
            oldest.shutdown(socket.SHUT_RDWR)

    def get_request(self) -> tuple[socket.socket, Any]:
        try:
            return self.socket.accept()
        except OSError as exc:
            if exc.errno in RESOURCE_ERRNOS:
                self._exhausted.warning(
                    "cannot accept (%s); pausing %.1f s", exc.strerror, ACCEPT_PAUSE
                )
                with self._lock:
                    self._drop_oldest_locked()
                time.sleep(ACCEPT_PAUSE)
            raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s qubesd: %(message)s")
    testbed = Testbed(args.run_dir)
    path = str(testbed.run.qubesd_socket)
    if os.path.exists(path):
        os.unlink(path)
    tmp = path + ".new"
    if os.path.exists(tmp):
        os.unlink(tmp)
    server = AdminServer(tmp, AdminApi(testbed))
    os.chmod(tmp, 0o600)
    os.rename(tmp, path)  # appears only once it accepts

    def stop(signum: int, frame: FrameType | None) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log.info("serving the admin API on %s", path)
    try:
        server.serve_forever(poll_interval=0.5)
    finally:
        server.server_close()
        if os.path.exists(path):
            os.unlink(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
