"""``qrexec-daemon``: command line, daemonizing and the event loop around :class:`.core.Daemon`.

Usage (spec §8)::

    qrexec-daemon [--socket-dir DIR] [-D/--direct] [-u/--uuid UUID]
                  [-p/--policy-program PATH] [-q/--quiet] [--policy-socket PATH]
                  [--qubesd-socket PATH] [--transport {socket,vchan}] [-v/--verbose]
                  DOMID NAME [DEFAULT_USER]

Environment: ``QREXEC_DAEMON_SOCKET_DIR`` (default ``/var/run/qubes``),
``QREXEC_POLICY_SOCKET`` (``/run/qubes/policy.sock``), ``QREXEC_QUBESD_SOCKET``
(``/run/qubesd.sock``), ``QREXEC_STARTUP_TIMEOUT`` (seconds, default 60),
``QREXEC_STARTUP_NOWAIT`` (the parent exits at once), ``QREXEC_LOG_DIR`` (per-VM log when
not ``--direct``, default ``/var/log/qubes``), ``QREXEC_PROTOCOL_VERSION`` (cap our
version), the resource caps ``QREXEC_DAEMON_MAX_CLIENTS`` (256),
``QREXEC_DAEMON_MAX_CONNECTIONS`` (256) and ``QREXEC_DAEMON_MAX_BUFFERED`` (4 MiB), the
deadline of a VM's HELLO on a dom0 call's data vchan ``QREXEC_DAEMON_HANDSHAKE_TIMEOUT``
(5 s), and the transport variables.

Without ``--direct`` the process forks: the parent exits 0 once the agent has connected,
3 when it did not within the startup timeout, 1 when the child died; the child starts a
new session, reads stdin from /dev/null and logs to ``<log dir>/qrexec.<NAME>.log``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import logging
import os
import select
import signal
import sys
import time
from collections.abc import Callable, Mapping

from qrexec.backends.select import load_backend
from qrexec.daemon.config import DaemonConfig
from qrexec.daemon.core import Daemon
from qrexec.errors import QrexecError

log = logging.getLogger("qrexec.daemon")

EXIT_STARTUP_TIMEOUT = 3
VM_CALLS_EXTENSION = "qrexec.daemon.vm_calls"
LOG_FORMAT = "%(asctime)s qrexec-daemon[%(process)d] %(levelname)s %(name)s: %(message)s"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qrexec-daemon", description="qrexec daemon: dom0's end of one VM's agent"
    )
    parser.add_argument("domid", type=int, help="domain id of the VM")
    parser.add_argument("name", help="name of the VM")
    parser.add_argument("default_user", nargs="?", default="user", help="user for DEFAULT:")
    parser.add_argument("--socket-dir", help="daemon socket folder (env QREXEC_DAEMON_SOCKET_DIR)")
    parser.add_argument("-D", "--direct", action="store_true", help="stay in the foreground")
    parser.add_argument("-u", "--uuid", help="UUID of the VM (adds the qrexec.uuid:… link)")
    parser.add_argument(
        "-p",
        "--policy-program",
        default="/usr/bin/qrexec-policy-exec",
        help="policy program used when the policy daemon is unreachable",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings only")
    parser.add_argument("--policy-socket", help="policy daemon socket (env QREXEC_POLICY_SOCKET)")
    parser.add_argument("--qubesd-socket", help="qubesd admin socket (env QREXEC_QUBESD_SOCKET)")
    parser.add_argument("--transport", help="socket or vchan (default: the selection rule)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def _env_number(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise QrexecError(f"{name}={raw!r} is not a number") from None
    if value < 0:
        raise QrexecError(f"{name}={raw!r} is negative")
    return value


def config_from(args: argparse.Namespace, env: Mapping[str, str]) -> DaemonConfig:
    from qrexec.protocol.negotiation import own_protocol_version

    if args.domid <= 0:
        raise QrexecError(f"DOMID must be a positive domain id, not {args.domid}")
    if not args.name or "/" in args.name:
        raise QrexecError(f"NAME {args.name!r} is not a domain name")
    return DaemonConfig(
        domid=args.domid,
        name=args.name,
        default_user=args.default_user,
        uuid=args.uuid,
        socket_dir=args.socket_dir or env.get("QREXEC_DAEMON_SOCKET_DIR") or "/var/run/qubes",
        own_version=own_protocol_version(env),
        startup_timeout=_env_number(env, "QREXEC_STARTUP_TIMEOUT", 60.0),
        policy_program=args.policy_program,
        policy_socket=args.policy_socket
        or env.get("QREXEC_POLICY_SOCKET")
        or "/run/qubes/policy.sock",
        qubesd_socket=args.qubesd_socket or env.get("QREXEC_QUBESD_SOCKET") or "/run/qubesd.sock",
        max_clients=int(_env_number(env, "QREXEC_DAEMON_MAX_CLIENTS", 256)),
        max_connections=int(_env_number(env, "QREXEC_DAEMON_MAX_CONNECTIONS", 256)),
        max_buffered=int(_env_number(env, "QREXEC_DAEMON_MAX_BUFFERED", 4 * 1024 * 1024)),
        handshake_timeout=_env_number(env, "QREXEC_DAEMON_HANDSHAKE_TIMEOUT", 5.0),
    )


async def serve(daemon: Daemon, on_first_connect: Callable[[], None] | None) -> int:
    loop = asyncio.get_running_loop()
    try:
        extension = importlib.import_module(VM_CALLS_EXTENSION)
    except ModuleNotFoundError as exc:
        if exc.name != VM_CALLS_EXTENSION:
            raise
        log.info("VM-initiated calls are not installed (%s): triggers are refused", exc.name)
    else:
        await extension.install(daemon)
    running = asyncio.ensure_future(daemon.run(on_first_connect))
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, running.cancel)
    try:
        await running
    except TimeoutError as exc:
        log.error("agent of %s did not connect: %s", daemon.config.name, exc)
        return EXIT_STARTUP_TIMEOUT
    except asyncio.CancelledError:
        log.info("stopping")
    finally:
        await daemon.clients.stop()
    return 0


def _wait_for_child(read_fd: int, pid: int, timeout: float) -> int:
    """The parent's side of daemonizing: the child's verdict as our exit code."""
    deadline = time.monotonic() + timeout + 5
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return EXIT_STARTUP_TIMEOUT
        ready, _, _ = select.select([read_fd], [], [], remaining)
        if ready:
            status = os.read(read_fd, 1)
            if status == b"0":
                return 0
            if status == b"3":
                return EXIT_STARTUP_TIMEOUT
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
            return 1


def _become_daemon(config: DaemonConfig, env: Mapping[str, str], level: int) -> None:
    os.setsid()
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    log_dir = env.get("QREXEC_LOG_DIR") or "/var/log/qubes"
    try:
        os.makedirs(log_dir, exist_ok=True)
        log_fd = os.open(
            os.path.join(log_dir, f"qrexec.{config.name}.log"),
            os.O_WRONLY | os.O_CREAT | os.O_APPEND,
            0o640,
        )
    except OSError as exc:
        print(f"qrexec-daemon: cannot open the log in {log_dir}: {exc}", file=sys.stderr)
        log_fd = os.open(os.devnull, os.O_WRONLY)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    logging.basicConfig(level=level, format=LOG_FORMAT, force=True)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    env = dict(os.environ)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    try:
        config = config_from(args, env)
        backend = load_backend(args.transport, env)
    except QrexecError as exc:
        parser.error(str(exc))
    if args.direct:
        logging.basicConfig(level=level, format=LOG_FORMAT)
        return asyncio.run(serve(Daemon(backend, config), None))
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid:
        os.close(write_fd)
        if env.get("QREXEC_STARTUP_NOWAIT"):
            return 0
        return _wait_for_child(read_fd, pid, config.startup_timeout)
    os.close(read_fd)
    _become_daemon(config, env, level)

    def connected() -> None:
        with contextlib.suppress(OSError):
            os.write(write_fd, b"0")
            os.close(write_fd)
        # Like upstream: after connecting, keep only the real uid/gid (setuid installs).
        if os.geteuid() != os.getuid() or os.getegid() != os.getgid():
            os.setresgid(os.getgid(), os.getgid(), os.getgid())
            os.setresuid(os.getuid(), os.getuid(), os.getuid())

    code = asyncio.run(serve(Daemon(backend, config), connected))
    if code == EXIT_STARTUP_TIMEOUT:
        with contextlib.suppress(OSError):
            os.write(write_fd, b"3")
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
