"""Options and environment shared by ``qrexec-policy-daemon`` and ``qrexec-policy-exec``,
and building a :class:`~qrexec.policy.decision.decide.Decider` from them.

Every setting has a flag and an environment variable (flags win), so each emulated dom0
of the testbed can run its own policy programs:

==========================  ============================  ===================================
flag                        environment                   default
==========================  ============================  ===================================
``--policy-path DIR`` (+)   ``QREXEC_POLICY_PATH``        /run/qubes/policy.d:/etc/qubes/…
``--legacy-policy-dir``     ``QREXEC_LEGACY_POLICY_DIR``  /etc/qubes-rpc/policy
``--policy-2011-dir``       ``QREXEC_2011_POLICY_DIR``    /etc/qubes_rpc/policy
``--system-info FILE``      ``QREXEC_SYSTEM_INFO``        dom0 only
``--audit-log FILE|-``      ``QREXEC_POLICY_AUDIT_LOG``   the process log only
``--ask-prompter SPEC``     ``QREXEC_POLICY_PROMPTER``    policy-ask
``--ask-timeout SECONDS``   ``QREXEC_POLICY_ASK_TIMEOUT`` 60
``--notifier SPEC``         ``QREXEC_POLICY_NOTIFIER``    log
``--policy-agent-socket``   ``QREXEC_POLICY_AGENT_SOCKET`` /var/run/qubes/policy-agent.sock
``--qrexec-client PATH``    ``QREXEC_CLIENT``             qrexec-client (on PATH)
==========================  ============================  ===================================

Prompter specs: ``policy-ask`` (the GuiVM's policy.Ask service: dom0's agent socket, or
``qrexec-client`` to another GuiVM), ``terminal[:TTY]``, ``scripted:FILE``, ``deny``.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping

from qrexec.policy.decision.agent_client import (
    DEFAULT_AGENT_SOCKET,
    DEFAULT_QREXEC_CLIENT,
    PolicyAgentClient,
)
from qrexec.policy.decision.audit import AuditLog
from qrexec.policy.decision.decide import DEFAULT_ASK_TIMEOUT, Decider
from qrexec.policy.decision.notify import NOTIFIER_SPECS, make_notifier
from qrexec.policy.decision.prompters import PROMPTER_SPECS, make_prompter
from qrexec.policy.engine.system_info import (
    JsonFileSystemInfo,
    StaticSystemInfo,
    SystemInfoSource,
    dom0_only,
)
from qrexec.policy.loading.fs_loader import load_policy
from qrexec.policy.loading.paths import ENV_SYSTEM_INFO, add_policy_path_arguments, paths_from_args
from qrexec.policy.loading.reload import ReloadingPolicy

ENV_AUDIT_LOG = "QREXEC_POLICY_AUDIT_LOG"
ENV_PROMPTER = "QREXEC_POLICY_PROMPTER"
ENV_ASK_TIMEOUT = "QREXEC_POLICY_ASK_TIMEOUT"
ENV_NOTIFIER = "QREXEC_POLICY_NOTIFIER"
ENV_AGENT_SOCKET = "QREXEC_POLICY_AGENT_SOCKET"
ENV_QREXEC_CLIENT = "QREXEC_CLIENT"


def add_decider_arguments(parser: argparse.ArgumentParser) -> None:
    add_policy_path_arguments(parser)
    parser.add_argument(
        "--system-info",
        metavar="FILE",
        help=f"system info JSON, internal.GetSystemInfo shape (default ${ENV_SYSTEM_INFO}, "
        "else dom0 only)",
    )
    parser.add_argument(
        "--audit-log",
        metavar="FILE",
        help=f"append one JSON line per decision ('-' = stderr; default ${ENV_AUDIT_LOG})",
    )
    parser.add_argument(
        "--ask-prompter",
        metavar="SPEC",
        help=f"who answers 'ask': {PROMPTER_SPECS} (default ${ENV_PROMPTER} or policy-ask)",
    )
    parser.add_argument(
        "--ask-timeout",
        type=float,
        metavar="SECONDS",
        help=f"deny an ask nobody answered in time (default ${ENV_ASK_TIMEOUT} or "
        f"{DEFAULT_ASK_TIMEOUT:g})",
    )
    parser.add_argument(
        "--notifier",
        metavar="SPEC",
        help=f"where policy.Notify goes: {NOTIFIER_SPECS} (default ${ENV_NOTIFIER} or log)",
    )
    parser.add_argument(
        "--policy-agent-socket",
        metavar="PATH",
        help=f"dom0's policy agent socket (default ${ENV_AGENT_SOCKET} or {DEFAULT_AGENT_SOCKET})",
    )
    parser.add_argument(
        "--qrexec-client",
        metavar="PATH",
        help=f"qrexec-client for asking other GuiVMs (default ${ENV_QREXEC_CLIENT} or "
        f"{DEFAULT_QREXEC_CLIENT})",
    )


def _opt(value: str | None, env: Mapping[str, str], name: str, default: str) -> str:
    return value if value is not None else env.get(name) or default


def build_decider(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> Decider:
    """A Decider as the flags and environment say. Raises ValueError for bad settings."""
    env = os.environ if env is None else env
    paths = paths_from_args(args, env)
    client = PolicyAgentClient(
        _opt(args.policy_agent_socket, env, ENV_AGENT_SOCKET, DEFAULT_AGENT_SOCKET),
        _opt(args.qrexec_client, env, ENV_QREXEC_CLIENT, DEFAULT_QREXEC_CLIENT),
    )
    prompter = make_prompter(
        _opt(args.ask_prompter, env, ENV_PROMPTER, "policy-ask"),
        agent_socket=client.agent_socket,
        qrexec_client=client.qrexec_client,
    )
    notifier = make_notifier(_opt(args.notifier, env, ENV_NOTIFIER, "log"), client)
    timeout = args.ask_timeout
    if timeout is None:
        raw = env.get(ENV_ASK_TIMEOUT)
        try:
            timeout = float(raw) if raw else DEFAULT_ASK_TIMEOUT
        except ValueError:
            raise ValueError(f"{ENV_ASK_TIMEOUT}={raw!r} is not a number") from None
    if not timeout > 0:
        raise ValueError(f"ask timeout must be positive, got {timeout}")
    info_path = args.system_info if args.system_info is not None else env.get(ENV_SYSTEM_INFO)
    system_info: SystemInfoSource = (
        JsonFileSystemInfo(info_path) if info_path else StaticSystemInfo(dom0_only())
    )
    audit_path = args.audit_log if args.audit_log is not None else env.get(ENV_AUDIT_LOG)
    return Decider(
        policy=ReloadingPolicy(lambda: load_policy(paths)),
        system_info=system_info,
        prompter=prompter,
        audit=AuditLog(audit_path or None),
        notifier=notifier,
        ask_timeout=timeout,
    )
