"""Command-line plumbing shared by the policy tools: where policy and system info come from.

Flags win over the environment, which wins over the defaults (see
:mod:`qrexec.policy.loading.paths`).
System info comes from ``--system-info FILE``, else ``$QREXEC_SYSTEM_INFO``, else a system with
only dom0 (the tools never contact qubesd).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Mapping

from qrexec.errors import SystemInfoError
from qrexec.policy.engine.policy import Policy
from qrexec.policy.engine.system_info import SystemInfo, dom0_only, load_system_info
from qrexec.policy.loading.fs_loader import load_policy
from qrexec.policy.loading.paths import ENV_SYSTEM_INFO, add_policy_path_arguments, paths_from_args


def add_policy_arguments(parser: argparse.ArgumentParser) -> None:
    """``--policy-path/--policy-dir``, ``--legacy-policy-dir``, ``--policy-2011-dir``,
    ``--system-info``."""
    add_policy_path_arguments(parser)
    parser.add_argument(
        "--system-info",
        metavar="FILE",
        help=f"system info JSON (internal.GetSystemInfo shape; default ${ENV_SYSTEM_INFO}, "
        "else a system with only dom0)",
    )


def load_from_args(args: argparse.Namespace, env: Mapping[str, str]) -> Policy:
    return load_policy(paths_from_args(args, env))


def system_info_from_args(args: argparse.Namespace, env: Mapping[str, str]) -> SystemInfo:
    """Raises SystemInfoError when the given file is missing or malformed."""
    path = args.system_info or env.get(ENV_SYSTEM_INFO)
    return load_system_info(path) if path else dom0_only()


def fail(prog: str, message: str, code: int = 1) -> int:
    print(f"{prog}: {message}", file=sys.stderr)
    return code


def quiet_logging() -> None:
    """Tools report problems themselves; the library's log lines would repeat them."""
    logging.basicConfig(level=logging.CRITICAL)


__all__ = [
    "SystemInfoError",
    "add_policy_arguments",
    "fail",
    "load_from_args",
    "quiet_logging",
    "system_info_from_args",
]
