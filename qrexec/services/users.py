"""Which account a call runs as, and how the agent gets there (spec §7, "User switching").

* **Test mode** (the agent is not root, as in upstream's CI): only calls for the agent's
  own user name run; anything else is refused. No identity change happens.
* **Root**: the agent switches to the requested user. When the PAM service
  (``--pam-service`` / ``QREXEC_PAM_SERVICE``, default ``qrexec`` as upstream; empty turns
  PAM off) is *configured* — a file of that name in ``/etc/pam.d`` or ``/usr/lib/pam.d``,
  or, on a system without ``/etc/pam.d``, a line for it in ``/etc/pam.conf`` — the call
  runs in a PAM login session (:mod:`.pam_launch`, :mod:`.pam_login`). Otherwise libpam
  would fall back to its ``other`` service, which usually refuses everything, so the agent
  does a plain login-style switch instead: supplementary groups (``initgroups``), gid,
  uid, a new session, ``chdir`` to ``$HOME`` and ``HOME``/``SHELL``/``USER``/``LOGNAME``
  exported. The check runs at every call, so adding the file needs no agent restart.
  Either way login profiles apply through the login shell / ``sh -l`` wrapper of
  :mod:`.launch`.

For an emulated domain (:class:`~qrexec.services.lookup.DomainRoot` other than
``/``), ``HOME`` is ``<root>/home/<user>``, created on first use and owned by the user, so
two emulated VMs never share a home. In a PAM session that ``HOME`` (and ``SHELL``,
``USER``, ``LOGNAME``) stays the agent's even if a PAM module sets it, as upstream puts
them after ``pam_open_session``; other PAM variables win over inherited ones.
Does not start processes.
"""

from __future__ import annotations

import logging
import os
import pwd
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from qrexec.errors import ServiceError
from qrexec.services.lookup import DomainRoot

log = logging.getLogger(__name__)

PAM_SERVICE_ENV = "QREXEC_PAM_SERVICE"
DEFAULT_PAM_SERVICE = "qrexec"
PAM_CONFIG_DIRS = ("/etc/pam.d", "/usr/lib/pam.d")
PAM_CONF_FILE = "/etc/pam.conf"


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
    #: The configured PAM service the call goes through (root agents only), else None.
    pam_service: str | None = None

    def login_environment(self) -> dict[str, str]:
        return {"HOME": self.home, "SHELL": self.shell, "USER": self.name, "LOGNAME": self.name}


def pam_service_name(explicit: str | None, env: Mapping[str, str]) -> str:
    """``--pam-service`` wins, then ``QREXEC_PAM_SERVICE``, else ``qrexec``; "" = no PAM.

    A name is a file name in the PAM folder: no ``/``, not ``.`` or ``..``, no NUL.
    """
    name = explicit if explicit is not None else env.get(PAM_SERVICE_ENV, DEFAULT_PAM_SERVICE)
    if name and ("/" in name or "\0" in name or name in (".", "..")):
        raise ServiceError(f"invalid PAM service name {name!r}: it must be a plain file name")
    return name


def pam_configured(
    service: str,
    config_dirs: Sequence[str] = PAM_CONFIG_DIRS,
    conf_file: str = PAM_CONF_FILE,
) -> bool:
    """Whether libpam has a configuration of its own for ``service`` (module docstring)."""
    if not service:
        return False
    if any(os.path.isfile(os.path.join(folder, service)) for folder in config_dirs):
        return True
    if os.path.isdir(config_dirs[0]):
        return False  # libpam reads pam.conf only without the pam.d folder
    try:
        with open(conf_file, encoding="utf-8", errors="replace") as lines:
            return any(line.split()[:1] == [service] for line in lines)
    except OSError:
        return False


def agent_is_root() -> bool:
    return os.geteuid() == 0


def resolve_user(
    requested: str,
    root: DomainRoot,
    env: Mapping[str, str] | None = None,
    *,
    pam_service: str = "",
) -> RunAs:
    """Decide how to run a call for ``requested``; ServiceError when it may not run.

    ``pam_service`` is used for a root agent when :func:`pam_configured`; "" never.
    """
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
            pam_service=pam_service if pam_configured(pam_service) else None,
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
