"""``qrexec-policy-daemon``: answers qrexec-daemon's policy questions over a unix socket.

Protocol: spec §6.1 (:mod:`qrexec.policy.decision.wire`). One query per connection; the answer is
written and the connection closed. Many connections are served at once (an ``ask`` waiting
for the user does not hold up anyone else). A malformed query — unknown, duplicate or
missing key, garbage, NUL, oversize, or a client that goes away or stalls before the empty
line — is logged with its reason (once a minute for a flood) and the connection closed
without an answer; the daemon keeps serving. At most 256 connections per socket may be
waiting for their request; beyond that the oldest is dropped (:mod:`qrexec.listening`).
It also serves policy.EvalSimple and policy.EvalGUI (spec §6.4) on their own sockets.
Policy edits are picked up by the next request (:mod:`qrexec.policy.loading.reload`).

Usage::

    qrexec-policy-daemon [--socket-path P] [--eval-socket-path P] [--gui-socket-path P]
                         [--policy-path DIR]... [--system-info FILE] [--audit-log FILE]
                         [--ask-prompter SPEC] [--ask-timeout S] [--notifier SPEC] ...

Environment: ``QREXEC_POLICY_SOCKET`` (default /run/qubes/policy.sock),
``QREXEC_POLICY_EVAL_SOCKET`` (default /etc/qubes-rpc/policy.EvalSimple),
``QREXEC_POLICY_GUI_SOCKET`` (default /etc/qubes-rpc/policy.EvalGUI); an empty value (or
``--eval-socket-path ''``) disables that service. The rest is in
:mod:`qrexec.policy.decision.decider_setup`. Sockets are mode 0660, group ``qubes`` when it exists.
SIGTERM/SIGINT stop it and remove its sockets.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Mapping
from typing import Final

from qrexec.errors import RemoteProtocolError
from qrexec.listening import GuardedServer, RateLimitedWarning, request_complete
from qrexec.policy.decision.decide import Decider
from qrexec.policy.decision.decider_setup import add_decider_arguments, build_decider
from qrexec.policy.decision.eval_services import EvalService
from qrexec.policy.decision.socket_service import (
    MAX_IDLE_CONNECTIONS,
    ConnectionTracker,
    remove_socket,
    start_unix_service,
)
from qrexec.policy.decision.wire import PolicyQuery, QueryDecoder

log = logging.getLogger("qrexec.policy.decision.daemon")

DEFAULT_SOCKET: Final = "/run/qubes/policy.sock"
DEFAULT_EVAL_SOCKET: Final = "/etc/qubes-rpc/policy.EvalSimple"
DEFAULT_GUI_SOCKET: Final = "/etc/qubes-rpc/policy.EvalGUI"
ENV_SOCKET: Final = "QREXEC_POLICY_SOCKET"
ENV_EVAL_SOCKET: Final = "QREXEC_POLICY_EVAL_SOCKET"
ENV_GUI_SOCKET: Final = "QREXEC_POLICY_GUI_SOCKET"
#: A client has this long to send its whole query (qrexec-daemon sends it at once).
QUERY_TIMEOUT: Final = 10.0
#: Environment overrides of :data:`QUERY_TIMEOUT` and of the idle-connection cap of each
#: socket (:data:`~qrexec.policy.socket_service.MAX_IDLE_CONNECTIONS`).
ENV_QUERY_TIMEOUT: Final = "QREXEC_POLICY_QUERY_TIMEOUT"
ENV_MAX_IDLE: Final = "QREXEC_POLICY_MAX_IDLE_CONNECTIONS"


async def read_query(reader: asyncio.StreamReader) -> PolicyQuery:
    """Read one §6.1 query; raises RemoteProtocolError (with the reason) on anything else."""
    decoder = QueryDecoder()
    while True:
        chunk = await reader.read(4096)
        if not chunk:
            decoder.eof()
        query = decoder.feed(chunk)
        if query is not None:
            return query


class PolicyServer:
    """The policy.sock connection handler around a :class:`Decider`."""

    def __init__(self, decider: Decider, query_timeout: float = QUERY_TIMEOUT) -> None:
        self.decider = decider
        self.query_timeout = query_timeout
        self.served = 0
        self.refused = 0
        #: A flood of bad or silent clients is logged once a minute, not per client.
        self._bad_query = RateLimitedWarning(log)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                async with asyncio.timeout(self.query_timeout):
                    query = await read_query(reader)
            except (RemoteProtocolError, TimeoutError, ConnectionError) as exc:
                self.refused += 1
                why = str(exc) or f"no complete query within {self.query_timeout:g} s"
                self._bad_query.warning("malformed policy query, connection closed: %s", why)
                return
            request_complete()
            response = await self.decider.decide(query, channel="policy.sock")
            self.served += 1
            try:
                writer.write(response.encode())
                await writer.drain()
            except ConnectionError as exc:
                log.warning("client left before the answer (%s): %s", response.result, exc)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


def _env_positive(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number") from None
    if value <= 0:
        raise ValueError(f"{name}={raw!r} must be positive")
    return value


def _socket_path(value: str | None, env: Mapping[str, str], name: str, default: str) -> str:
    if value is not None:
        return value
    return env.get(name, default)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qrexec-policy-daemon",
        description="Evaluate qrexec policy for qrexec-daemon (Qubes policy daemon protocol).",
    )
    p.add_argument(
        "--socket-path", help=f"policy socket (default ${ENV_SOCKET} or {DEFAULT_SOCKET})"
    )
    p.add_argument(
        "--eval-socket-path",
        help=f"policy.EvalSimple socket, '' to disable (default ${ENV_EVAL_SOCKET} or "
        f"{DEFAULT_EVAL_SOCKET})",
    )
    p.add_argument(
        "--gui-socket-path",
        help=f"policy.EvalGUI socket, '' to disable (default ${ENV_GUI_SOCKET} or "
        f"{DEFAULT_GUI_SOCKET})",
    )
    add_decider_arguments(p)
    p.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    p.add_argument("-q", "--quiet", action="store_true", help="log warnings and errors only")
    return p


async def serve(
    args: argparse.Namespace,
    env: Mapping[str, str],
    *,
    ready: asyncio.Event | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Run until ``stop`` is set (or SIGTERM/SIGINT when running as the program)."""
    decider = build_decider(args, env)
    decider.policy.get_policy()  # load now: errors show up in the log at start
    paths = {
        "policy": _socket_path(args.socket_path, env, ENV_SOCKET, DEFAULT_SOCKET),
        "EvalSimple": _socket_path(
            args.eval_socket_path, env, ENV_EVAL_SOCKET, DEFAULT_EVAL_SOCKET
        ),
        "EvalGUI": _socket_path(args.gui_socket_path, env, ENV_GUI_SOCKET, DEFAULT_GUI_SOCKET),
    }
    handlers = {
        "policy": PolicyServer(
            decider, _env_positive(env, ENV_QUERY_TIMEOUT, QUERY_TIMEOUT)
        ).handle,
        "EvalSimple": EvalService(decider, gui=False).handle,
        "EvalGUI": EvalService(decider, gui=True).handle,
    }
    max_idle = int(_env_positive(env, ENV_MAX_IDLE, MAX_IDLE_CONNECTIONS))
    servers: list[tuple[str, GuardedServer]] = []
    connections = ConnectionTracker()
    stop = stop or asyncio.Event()
    try:
        for what, path in paths.items():
            if path:
                handler = connections.wrap(handlers[what])
                server = await start_unix_service(path, handler, max_idle=max_idle)
                servers.append((path, server))
                log.info("serving %s on %s", what, path)
        if ready is not None:
            ready.set()
        await stop.wait()
    finally:
        for path, server in servers:
            server.close()
            remove_socket(path)
        await connections.aclose()
        await decider.flush_notifications()
        decider.audit.close()


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(
        level=level, stream=sys.stderr, format="%(asctime)s %(name)s %(levelname)s: %(message)s"
    )

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(args, os.environ, stop=stop)

    try:
        asyncio.run(run())
    except (ValueError, OSError) as exc:
        print(f"qrexec-policy-daemon: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
