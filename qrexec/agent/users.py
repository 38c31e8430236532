"""Which account a call runs as, and how the agent gets there (spec §7, "User switching").

* **Test mode** (the agent is not root, as in upstream's CI): only calls for the agent's
  own user name run; anything else is refused. No identity change happens.
* **Root**: the agent switches to the requested user with a plain login-style switch:
  supplementary groups (``initgroups``), gid, uid, a new session, ``chdir`` to ``$HOME``
  and ``HOME``/``SHELL``/``USER``/``LOGNAME`` exported. Python has no PAM binding in the
  standard library and none is installed here, so the PAM service ``qrexec`` is not used;
  login profiles still apply through the ``sh -l`` wrapper of :mod:`.launch`.

For an emulated domain (:class:`~qrexec.agent.service_lookup.DomainRoot` other than
``/``), ``HOME`` is ``<root>/home/<user>``, created on first use and owned by the user, so
two emulated VMs never share a home. Does not start processes.
"""

from __future__ import annotations

import logging
import os
import pwd
from collections.abc import Mapping
from dataclasses import dataclass

from qrexec.agent.service_lookup import DomainRoot
from qrexec.errors import ServiceError

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RunAs:
    """The identity and login environment of one call.

    ``switch`` is False when the process keeps the agent's identity (test mode, or a root
    agent running a call for root). ``login`` is True for a root agent: its calls get a
    login shell / the ``sh -l`` wrapper, whoever they run as; test mode execs directly.
    """

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]
    home: str
    shell: str
    switch: bool
    login: bool = False

    def login_environment(self) -> dict[str, str]:
        return {"HOME": self.home, "SHELL": self.shell, "USER": self.name, "LOGNAME": self.name}


def agent_is_root() -> bool:
    return os.geteuid() == 0


def resolve_user(requested: str, root: DomainRoot, env: Mapping[str, str] | None = None) -> RunAs:
    """Decide how to run a call for ``requested``; ServiceError when it may not run."""
    environ = os.environ if env is None else env
    if not agent_is_root():
        own = pwd.getpwuid(os.getuid())
        if requested != own.pw_name:
            raise ServiceError(
                f"agent runs as {own.pw_name!r} (test mode): refusing a call for {requested!r}"
            )
        home = root.home_of(own.pw_name) if not root.is_real else environ.get("HOME", own.pw_dir)
        run_as = RunAs(
            own.pw_name, own.pw_uid, own.pw_gid, (), home, own.pw_shell or "/bin/sh", False
        )
    else:
        try:
            entry = pwd.getpwnam(requested)
        except KeyError:
            raise ServiceError(f"no such user {requested!r}") from None
        home = entry.pw_dir if root.is_real else root.home_of(entry.pw_name)
        groups = tuple(os.getgrouplist(entry.pw_name, entry.pw_gid))
        switch = entry.pw_uid != os.geteuid()
        run_as = RunAs(
            entry.pw_name,
            entry.pw_uid,
            entry.pw_gid,
            groups,
            home,
            entry.pw_shell or "/bin/sh",
            switch,
            login=True,
        )
    if not root.is_real:
        ensure_home(run_as)
    return run_as


def ensure_home(run_as: RunAs) -> None:
    """Create an emulated domain's home folder for the user if it does not exist yet."""
    if os.path.isdir(run_as.home):
        return
    try:
        os.makedirs(run_as.home, mode=0o700, exist_ok=True)
        if agent_is_root():
            os.chown(run_as.home, run_as.uid, run_as.gid)
    except OSError as exc:
        raise ServiceError(f"cannot create home folder {run_as.home}: {exc}") from None
    log.info("created home folder %s for %s", run_as.home, run_as.name)
