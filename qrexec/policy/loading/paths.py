"""Where a dom0's policy lives: the policy.d directories and the two legacy directories.

Every root is configurable, from flags or the environment, so each emulated dom0 of the
testbed has its own policy:

* ``QREXEC_POLICY_PATH``: colon-separated policy.d directories, earlier ones win on equal
  file names (default ``/run/qubes/policy.d:/etc/qubes/policy.d``);
* ``QREXEC_LEGACY_POLICY_DIR``: the R4.0 per-service directory read by ``!compat-4.0``
  (default ``/etc/qubes-rpc/policy``);
* ``QREXEC_2011_POLICY_DIR``: the 2011 per-service directory read by ``!compat-2011``, and on
  its own when no policy.d directory exists (default ``/etc/qubes_rpc/policy``).

Does no I/O.
"""

from __future__ import annotations

import argparse
import dataclasses
import posixpath
from collections.abc import Mapping, Sequence

DEFAULT_POLICY_DIRS = ("/run/qubes/policy.d", "/etc/qubes/policy.d")
DEFAULT_LEGACY_DIR = "/etc/qubes-rpc/policy"
DEFAULT_2011_DIR = "/etc/qubes_rpc/policy"
#: File (in the last policy.d directory) that no-match messages tell the admin to edit.
USER_POLICY_NAME = "30-user.policy"

ENV_POLICY_PATH = "QREXEC_POLICY_PATH"
ENV_LEGACY_DIR = "QREXEC_LEGACY_POLICY_DIR"
ENV_2011_DIR = "QREXEC_2011_POLICY_DIR"
ENV_SYSTEM_INFO = "QREXEC_SYSTEM_INFO"


@dataclasses.dataclass(frozen=True, slots=True)
class PolicyPaths:
    """The directories one dom0 reads its policy from."""

    policy_dirs: tuple[str, ...] = DEFAULT_POLICY_DIRS
    legacy_dir: str = DEFAULT_LEGACY_DIR
    dir_2011: str = DEFAULT_2011_DIR

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> PolicyPaths:
        """Paths from the environment (unset or empty variables keep the defaults)."""
        dirs = tuple(p for p in env.get(ENV_POLICY_PATH, "").split(":") if p)
        return cls(
            policy_dirs=dirs or DEFAULT_POLICY_DIRS,
            legacy_dir=env.get(ENV_LEGACY_DIR) or DEFAULT_LEGACY_DIR,
            dir_2011=env.get(ENV_2011_DIR) or DEFAULT_2011_DIR,
        )

    def with_overrides(
        self,
        policy_dirs: Sequence[str] | None = None,
        legacy_dir: str | None = None,
        dir_2011: str | None = None,
    ) -> PolicyPaths:
        """These paths with the given ones replaced (what command-line flags do)."""
        return PolicyPaths(
            policy_dirs=tuple(policy_dirs) if policy_dirs else self.policy_dirs,
            legacy_dir=legacy_dir or self.legacy_dir,
            dir_2011=dir_2011 or self.dir_2011,
        )

    @property
    def user_policy_file(self) -> str:
        """Where an admin adds own rules: 30-user.policy in the last (persistent) directory."""
        return posixpath.join(self.policy_dirs[-1], USER_POLICY_NAME)


def add_policy_path_arguments(parser: argparse.ArgumentParser) -> None:
    """The policy-location flags every policy tool shares (see :func:`paths_from_args`)."""
    parser.add_argument(
        "--policy-path",
        "--policy-dir",
        dest="policy_path",
        action="append",
        metavar="DIR",
        help=f"policy.d directory (repeatable; default ${ENV_POLICY_PATH} or "
        f"{':'.join(DEFAULT_POLICY_DIRS)})",
    )
    parser.add_argument(
        "--legacy-policy-dir",
        metavar="DIR",
        help=f"R4.0 policy directory for !compat-4.0 (default ${ENV_LEGACY_DIR} or "
        f"{DEFAULT_LEGACY_DIR})",
    )
    parser.add_argument(
        "--policy-2011-dir",
        metavar="DIR",
        help=f"2011 policy directory for !compat-2011 (default ${ENV_2011_DIR} or "
        f"{DEFAULT_2011_DIR})",
    )


def paths_from_args(args: argparse.Namespace, env: Mapping[str, str]) -> PolicyPaths:
    """Flags first, then the environment, then the defaults."""
    return PolicyPaths.from_env(env).with_overrides(
        policy_dirs=args.policy_path,
        legacy_dir=args.legacy_policy_dir,
        dir_2011=args.policy_2011_dir,
    )
