"""``qrexec-agent``: command line, logging and the event loop around :class:`.control.Agent`.

Usage (spec §8, plus the emulation's options)::

    qrexec-agent [-a/--agent-socket PATH] [-s/--fork-server-socket PATTERN]
                 [-S/--no-fork-server] [--transport {socket,vchan}] [--domain-root DIR]
                 [--pam-service NAME] [-v/--verbose]

Environment: ``QREXEC_AGENT_SOCKET`` (trigger socket, default
``/var/run/qubes/qrexec-agent``), ``QREXEC_DOMAIN_ROOT`` (emulated domain root),
``QREXEC_PAM_SERVICE`` (PAM service of a root agent, default ``qrexec``, empty for none),
``QREXEC_SERVICE_PATH``, ``QUBES_RPC_CONFIG_PATH``, ``QREXEC_PROTOCOL_VERSION`` (cap our
version), ``QREXEC_TRANSPORT`` / ``VCHAN_DOMAIN`` / ``VCHAN_SOCKET_DIR`` (transport).

The fork server (``qrexec-fork-server``) is not part of this implementation: the options
are accepted for compatibility and every call runs directly from the agent, which is what
upstream does for ``nogui:`` calls or without a fork server socket. Usage errors exit 2.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import os
import signal
import sys

from qrexec.agent.calls import AgentSettings
from qrexec.agent.control import EXIT_PROTOCOL_VIOLATION, Agent, DaemonProtocolViolation
from qrexec.backends.select import load_backend
from qrexec.errors import QrexecError
from qrexec.services.lookup import (
    DEFAULT_RPC_CONFIG_PATH,
    DEFAULT_SERVICE_PATH,
    RPC_CONFIG_PATH_ENV,
    SERVICE_PATH_ENV,
    DomainRoot,
    search_path,
)
from qrexec.services.relay import ignore_sigusr1
from qrexec.services.users import DEFAULT_PAM_SERVICE, PAM_SERVICE_ENV, pam_service_name

log = logging.getLogger("qrexec.agent")

AGENT_SOCKET_ENV = "QREXEC_AGENT_SOCKET"
DEFAULT_AGENT_SOCKET = "/var/run/qubes/qrexec-agent"
DEFAULT_FORK_SERVER_PATTERN = "/var/run/qubes/qrexec-server.%s.sock"
#: Module that adds VM-initiated calls (trigger socket) when present.
TRIGGER_EXTENSION = "qrexec.agent.trigger"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qrexec-agent", description="qrexec agent: runs commands and services for dom0"
    )
    parser.add_argument(
        "-a",
        "--agent-socket",
        help=f"trigger socket for qrexec-client-vm (env {AGENT_SOCKET_ENV}, "
        f"default {DEFAULT_AGENT_SOCKET})",
    )
    parser.add_argument(
        "-s",
        "--fork-server-socket",
        default=DEFAULT_FORK_SERVER_PATTERN,
        help="fork server socket pattern (%%s = user); accepted, fork server not used",
    )
    parser.add_argument(
        "-S", "--no-fork-server", action="store_true", help="do not use a fork server"
    )
    parser.add_argument("--transport", help="socket or vchan (default: the selection rule)")
    parser.add_argument(
        "--domain-root",
        help="folder standing for / of this (emulated) domain (env QREXEC_DOMAIN_ROOT)",
    )
    parser.add_argument(
        "--pam-service",
        help=f"PAM service a root agent switches users through when it is configured "
        f"(env {PAM_SERVICE_ENV}, default {DEFAULT_PAM_SERVICE}; empty: never PAM)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def settings_from(args: argparse.Namespace) -> AgentSettings:
    from qrexec.protocol.negotiation import own_protocol_version

    env = dict(os.environ)
    return AgentSettings(
        root=DomainRoot.from_env(args.domain_root, env),
        service_path=search_path(env, SERVICE_PATH_ENV, DEFAULT_SERVICE_PATH),
        config_path=search_path(env, RPC_CONFIG_PATH_ENV, DEFAULT_RPC_CONFIG_PATH),
        env=env,
        own_version=own_protocol_version(env),
        pam_service=pam_service_name(args.pam_service, env),
    )


async def run_agent(agent: Agent) -> int:
    """Serve until SIGTERM/SIGINT (0) or a daemon's protocol violation (spec §15.7)."""
    loop = asyncio.get_running_loop()
    ignore_sigusr1(loop)
    serving = asyncio.ensure_future(agent.serve_forever())
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, serving.cancel)
    try:
        extension = importlib.import_module(TRIGGER_EXTENSION)
    except ModuleNotFoundError as exc:
        if exc.name != TRIGGER_EXTENSION:
            raise
        log.info("no VM-initiated call support installed (%s)", TRIGGER_EXTENSION)
    else:
        await extension.install(agent)
    status = 0
    try:
        await serving
    except asyncio.CancelledError:
        pass
    except DaemonProtocolViolation as exc:
        log.error("dom0's daemon broke the control protocol: %s; exiting", exc)
        status = EXIT_PROTOCOL_VIOLATION
    await agent.shutdown()
    return status


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s qrexec-agent[%(process)d] %(levelname)s %(name)s: %(message)s",
    )
    try:
        settings = settings_from(args)
        backend = load_backend(args.transport, settings.env)
    except QrexecError as exc:
        print(f"qrexec-agent: {exc}", file=sys.stderr)
        return 2
    agent_socket = args.agent_socket or settings.env.get(AGENT_SOCKET_ENV) or DEFAULT_AGENT_SOCKET
    log.info(
        "starting: domain root %s, service path %s",
        settings.root.root,
        ":".join(settings.service_path),
    )
    agent = Agent(backend, settings, agent_socket=agent_socket)
    return asyncio.run(run_agent(agent))


if __name__ == "__main__":
    sys.exit(main())
