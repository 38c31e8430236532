"""The per-call PAM helper of a root agent: a PAM login session around one call (spec §7).

A root agent whose PAM service is configured (see :mod:`.pam_launch`) starts this module
as a fresh root process for each call, with the call's stdio and environment, and this
process does what upstream's agent does in its per-call child:

1. ``pam_start(SERVICE, USER)``, ``pam_authenticate`` (every prompt answered with an empty
   string), ``initgroups``, ``pam_setcred(PAM_ESTABLISH_CRED)``, ``pam_open_session``;
2. fork; the child takes the gid and uid, starts a new session, changes to ``HOME`` and
   execs the call's program with the merged environment (:func:`merge_environment`);
3. the parent waits, then ``pam_close_session``, ``pam_setcred(PAM_DELETE_CRED)``,
   ``pam_end``, and exits with the child's code (a signal n as 128 + n, as the wire does).

``pam_acct_mgmt`` is not called, as upstream's agent does not: dom0's policy is the
authority on who may run a call, and an account stack in the service file would otherwise
start refusing calls that real Qubes VMs run.

Status pipe (``--status-fd``, the agent reads it to EOF before relaying): ``S`` once the
session is open; then the child writes ``E reason`` if it cannot switch or exec (its copy
closes on a successful exec). A PAM failure writes only ``E reason``. Nothing at all
means this process died before PAM (an import error, say). Every failure exits 125.
Running in its own process keeps whatever PAM modules do to the calling process (groups,
limits, keyrings, loginuid) away from the agent. Does not relay any data.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Mapping
from typing import TextIO

from qrexec.errors import PamError
from qrexec.services.pam import PamSession

log = logging.getLogger("qrexec.services.pam_login")

EXIT_PROBLEM = 125
SIGNAL_EXIT_BASE = 128
STATUS_SESSION_OPEN = b"S"
STATUS_ERROR = b"E "
#: Variables that describe the call itself: the agent's values win over PAM's.
CALL_VARIABLES = frozenset({"HOME", "SHELL", "USER", "LOGNAME"})
#: Signals the helper passes on to the call's process instead of dying without closing.
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def merge_environment(call_env: Mapping[str, str], pam_env: Mapping[str, str]) -> dict[str, str]:
    """The call's environment after PAM: PAM's variables override inherited ones, like a
    login, but never ``HOME``/``SHELL``/``USER``/``LOGNAME`` or a ``QREXEC*`` variable:
    those are the call's own (HOME stays under an emulated domain's root)."""
    merged = dict(call_env)
    for name, value in pam_env.items():
        if name in CALL_VARIABLES or name.startswith("QREXEC"):
            continue
        merged[name] = value
    return merged


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qrexec-pam-login")
    parser.add_argument("--service", required=True)
    parser.add_argument("--user", required=True)
    parser.add_argument("--uid", type=int, required=True)
    parser.add_argument("--gid", type=int, required=True)
    parser.add_argument("--home", required=True)
    parser.add_argument("--status-fd", type=int, required=True)
    parser.add_argument("--log-fd", type=int)
    parser.add_argument("--executable", help="program to exec when argv[0] is not its path")
    parser.add_argument("argv", nargs="+")
    return parser


def _report(fd: int, data: bytes) -> None:
    with contextlib.suppress(OSError):  # the agent is gone; the exit code still tells
        os.write(fd, data)


def _exec_child(args: argparse.Namespace, env: dict[str, str]) -> None:
    """In the forked child: drop to the user and exec; never returns."""
    try:
        for signum in (*FORWARDED_SIGNALS, signal.SIGPIPE, signal.SIGXFSZ):
            signal.signal(signum, signal.SIG_DFL)  # Python ignores some; exec keeps SIG_IGN
        os.setgid(args.gid)
        os.setuid(args.uid)
        os.setsid()
        try:
            os.chdir(args.home)
        except OSError as exc:
            log.warning("cannot enter %s: %s", args.home, exc.strerror)
        os.execvpe(args.executable or args.argv[0], args.argv, env)
    except OSError as exc:
        what = args.executable or args.argv[0]
        _report(args.status_fd, STATUS_ERROR + f"cannot execute {what!r}: {exc}".encode())
    finally:
        os._exit(EXIT_PROBLEM)


def _wait(child: int) -> int:
    def forward(signum: int, _frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signum)

    for signum in FORWARDED_SIGNALS:
        signal.signal(signum, forward)
    _pid, status = os.waitpid(child, 0)
    if os.WIFSIGNALED(status):
        return SIGNAL_EXIT_BASE + os.WTERMSIG(status)
    return os.waitstatus_to_exitcode(status)


def _detach_stdio() -> None:
    """Let the child own the call's stdio: the agent sees EOF when the child closes it."""
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)


def run(args: argparse.Namespace) -> int:
    status_fd = args.status_fd
    os.set_inheritable(status_fd, False)
    try:
        session = PamSession(args.service, args.user)
    except PamError as exc:
        _report(status_fd, STATUS_ERROR + str(exc).encode())
        return EXIT_PROBLEM
    try:
        session.authenticate()
        try:
            os.initgroups(args.user, args.gid)
        except OSError as exc:
            raise PamError("initgroups", 0, exc.strerror or str(exc)) from None
        session.establish_credentials()
        try:
            session.open_session()
        except PamError:
            with contextlib.suppress(PamError):
                session.delete_credentials()
            raise
        env = merge_environment(os.environ, session.environment())
        _report(status_fd, STATUS_SESSION_OPEN)
        try:
            child = os.fork()
        except OSError as exc:
            _finish(session)
            raise PamError("fork", 0, exc.strerror or str(exc)) from None
        if child == 0:
            _exec_child(args, env)
        os.close(status_fd)
        _detach_stdio()
        code = _wait(child)
        _finish(session)
        return code
    except PamError as exc:
        _report(status_fd, STATUS_ERROR + str(exc).encode())
        return EXIT_PROBLEM
    finally:
        session.end()


def _finish(session: PamSession) -> None:
    """Close the session and drop the credentials; a failure here is only logged."""
    for step in (session.close_session, session.delete_credentials):
        try:
            step()
        except PamError as exc:
            log.warning("after the call: %s", exc)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    stream: TextIO = sys.stderr
    if args.log_fd is not None:
        os.set_inheritable(args.log_fd, False)
        stream = os.fdopen(args.log_fd, "w", buffering=1, errors="replace")
    logging.basicConfig(
        stream=stream,
        level=logging.INFO,
        format="%(asctime)s qrexec-agent[%(process)d] %(levelname)s %(name)s: %(message)s",
    )
    try:
        return run(args)
    except OSError as exc:  # fork failed, say: still a clean 125
        log.warning("PAM helper for %r failed: %s", args.user, exc)
        _report(args.status_fd, STATUS_ERROR + f"PAM helper failed: {exc}".encode())
        return EXIT_PROBLEM


if __name__ == "__main__":
    sys.exit(main())
