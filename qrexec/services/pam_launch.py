"""The agent's side of PAM user switching: starting a call through the PAM helper.

Whether a call uses PAM at all is decided in :mod:`.users`. A PAM call's process is the
helper of :mod:`.pam_login`, started as root with the call's stdio, environment and argv;
:func:`start_pam_process` waits (without blocking the loop) until the helper reports that
the session is open and the program started, and turns any refusal into
:class:`~qrexec.errors.ServiceError` (exit 125). The agent never imports libpam itself. Does
not relay data.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from typing import IO, Any

import qrexec
from qrexec.errors import ServiceError
from qrexec.services import relay
from qrexec.services.launch import ProcessSpec

HELPER_MODULE = "qrexec.services.pam_login"
STATUS_SESSION_OPEN = b"S"
STATUS_ERROR = b"E "
#: More than any status the helper writes; a longer report is cut.
MAX_STATUS = 4096

_StdStream = int | IO[Any] | None


def helper_argv(spec: ProcessSpec, service: str, status_fd: int, log_fd: int | None) -> list[str]:
    """The command line of the PAM helper for ``spec``.

    ``-I`` so that nothing from the environment or the working folder can change which
    code runs as root; the package's own folder is put on ``sys.path`` explicitly.
    """
    run_as = spec.run_as
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(qrexec.__file__)))
    bootstrap = (
        f"import sys; sys.path.insert(0, {package_parent!r}); "
        f"from {HELPER_MODULE} import main; sys.exit(main())"
    )
    argv = [sys.executable, "-I", "-c", bootstrap, "--service", service, "--user", run_as.name]
    argv += ["--uid", str(run_as.uid), "--gid", str(run_as.gid), "--home", run_as.home]
    argv += ["--status-fd", str(status_fd)]
    if log_fd is not None:
        argv += ["--log-fd", str(log_fd)]
    if spec.executable is not None:
        argv += ["--executable", spec.executable]
    return [*argv, "--", *spec.argv]


def spawn_pam_helper(
    spec: ProcessSpec,
    service: str,
    *,
    stdin: _StdStream,
    stdout: _StdStream,
    stderr: _StdStream,
) -> tuple[subprocess.Popen[bytes], int]:
    """Start the helper; returns it and the read end of its status pipe."""
    status_r, status_w = os.pipe()
    log_fd: int | None = None
    with contextlib.suppress(OSError):
        log_fd = os.dup(2)  # the agent's own log, for what the helper logs later
    passed = (status_w,) if log_fd is None else (status_w, log_fd)
    try:
        proc = subprocess.Popen(
            helper_argv(spec, service, status_w, log_fd),
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            env=spec.env,
            cwd="/",
            start_new_session=True,
            pass_fds=passed,
        )
    except OSError as exc:
        os.close(status_r)
        raise ServiceError(f"cannot start the PAM helper: {exc.strerror or exc}") from None
    finally:
        for fd in passed:
            os.close(fd)
    return proc, status_r


def status_error(report: bytes, returncode: int | None) -> str | None:
    """What went wrong according to the helper's status report, None if the call runs."""
    if report == STATUS_SESSION_OPEN:
        return None
    text = report.removeprefix(STATUS_SESSION_OPEN)
    if text.startswith(STATUS_ERROR):
        return text[len(STATUS_ERROR) :].decode(errors="replace")
    if not report:
        return f"the PAM helper exited (code {returncode}) before opening a session"
    return f"the PAM helper sent an unexpected status {report[:80]!r}"


async def start_pam_process(
    spec: ProcessSpec,
    service: str,
    *,
    stdin: _StdStream,
    stdout: _StdStream,
    stderr: _StdStream,
) -> subprocess.Popen[bytes]:
    """Start ``spec`` in a PAM session of ``service``; ServiceError when PAM or exec fails."""
    proc, status_fd = spawn_pam_helper(spec, service, stdin=stdin, stdout=stdout, stderr=stderr)
    report = b""
    try:
        os.set_blocking(status_fd, False)
        while len(report) < MAX_STATUS:
            chunk = await relay.read_fd(status_fd, MAX_STATUS)
            if not chunk:
                break
            report += chunk
    except BaseException:  # cancelled (agent shutting down): still never leave a zombie
        relay.reap_in_background(proc)
        raise
    finally:
        os.close(status_fd)
    if status_error(report, None) is None:
        return proc
    # The helper exits at once after a failure (closing a session it opened): wait for
    # it, so that the call's end also means the end of its PAM session.
    failure = status_error(report, await relay.wait_process(proc))
    raise ServiceError(f"PAM service {service!r}, user {spec.run_as.name!r}: {failure}")
