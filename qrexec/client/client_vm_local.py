"""qrexec-client-vm's LOCAL_PROGRAM: how it is started, wired and waited for (spec §15.4).

* **Start**: right after the agent's 8-byte answer, before the vchan server exists (a
  refused call runs nothing). ``fork`` + ``execve`` of the path exactly as given (no PATH
  search), ``argv[0]`` = its basename; when the exec fails the child exits 255.
* **stdio**: stdin and stdout are two AF_UNIX stream socketpairs; stderr is ours.
* **Environment**: ours, plus ``QREXEC_AGENT_PID`` = our pid, and ``SAVED_FD_0``/``_1``
  (``_2`` when ``PASS_LOCAL_STDERR`` is set, even empty) naming copies of our original
  descriptors (taken by the caller, see :func:`save_std_fds`).
* **Flow** (through :mod:`.caller`): the program's stdout becomes STDIN; the service's
  STDOUT goes to the program's stdin, and its STDOUT EOF shuts that socket down for
  writing; the service's STDERR goes to our stderr.
* **SIGUSR1** (one-shot; to ``$QREXEC_AGENT_PID``): we shut the stdout socket down for
  reading, without sending EOF for it, and from then on read the stdin socket instead:
  whatever the program writes to its fd 0 goes out as STDIN, while the service's STDOUT
  still flows into it. STDIN EOF goes out when that read ends (or at once when EXIT_CODE
  came first).
* **Exit**: the remote code when non-zero, else the program's status (128 + signal); a
  vchan closed without EXIT_CODE gives 255. We never send EXIT_CODE, and we wait for it.

Blocking, no asyncio, no subprocess: it runs once per call.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from collections.abc import Mapping, Sequence

from qrexec.protocol.constants import SIGNAL_EXIT_BASE

#: Status of the child when the program cannot be executed (upstream's).
EXEC_FAILED_EXIT = 255
AGENT_PID_ENV = "QREXEC_AGENT_PID"
PASS_LOCAL_STDERR_ENV = "PASS_LOCAL_STDERR"


def save_std_fds(env: Mapping[str, str]) -> list[int]:
    """Copies of our stdin and stdout (and stderr with ``PASS_LOCAL_STDERR``) for the
    local program's ``SAVED_FD_*``.

    Taken first thing, while the lowest descriptors are free, so the numbers are single
    digits: ``/bin/sh`` (dash) cannot redirect to ``>&$SAVED_FD_1`` past fd 9.
    """
    saved = [os.dup(0), os.dup(1)]
    if PASS_LOCAL_STDERR_ENV in env:
        saved.append(os.dup(2))
    return saved


def program_environment(env: Mapping[str, str], saved: Sequence[int]) -> dict[str, str]:
    """The program's environment: ours, ``QREXEC_AGENT_PID`` and ``SAVED_FD_*``."""
    child_env = dict(env)
    child_env[AGENT_PID_ENV] = str(os.getpid())
    for number, fd in enumerate(saved):
        child_env[f"SAVED_FD_{number}"] = str(fd)
    return child_env


class LocalProgram:
    """A started LOCAL_PROGRAM and our ends of its two sockets."""

    def __init__(self, argv: Sequence[str], env: Mapping[str, str], saved: Sequence[int]) -> None:
        #: Our end of the program's stdin socket (service STDOUT in; single-socket input).
        self.stdin_sock, child_stdin = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        #: Our end of the program's stdout socket (becomes STDIN).
        self.stdout_sock, child_stdout = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.switched = False
        self._input_switched = False
        signal.signal(signal.SIGUSR1, self._on_sigusr1)
        path = argv[0]
        child_argv = [os.path.basename(path), *argv[1:]]
        child_env = program_environment(env, saved)
        self.pid = os.fork()
        if self.pid == 0:  # pragma: no cover - the child only execs
            try:
                os.dup2(child_stdin.fileno(), 0)
                os.dup2(child_stdout.fileno(), 1)
                for fd in saved:
                    os.set_inheritable(fd, True)
                # Python ignores SIGPIPE; an exec'd program must get the default back.
                signal.signal(signal.SIGPIPE, signal.SIG_DFL)
                os.execve(path, child_argv, child_env)
            except OSError as exc:
                os.write(2, f"qrexec-client-vm: cannot execute {path}: {exc.strerror}\n".encode())
            finally:
                os._exit(EXEC_FAILED_EXIT)
        child_stdin.close()
        child_stdout.close()

    def _on_sigusr1(self, signum: int, frame: object) -> None:
        """Single-socket mode, once: stop reading stdout (no EOF for it) and wake the
        input reader, which then reads the stdin socket (:meth:`next_input`)."""
        if self.switched:
            return
        self.switched = True
        try:  # noqa: SIM105 - contextlib costs each per-call client ~0.4 ms to import
            self.stdout_sock.shutdown(socket.SHUT_RD)
        except OSError:
            pass

    def next_input(self) -> int | None:
        """Where the input goes on after an EOF: the stdin socket once, after SIGUSR1."""
        if self.switched and not self._input_switched:
            self._input_switched = True
            return self.stdin_sock.fileno()
        return None

    def finish(self) -> int:
        """Wait for the program once the call is over; its status (128 + signal).

        As upstream, the program's sockets stay open while we wait, so late output does
        not hit EPIPE; unlike upstream, its stdin reads EOF (a program still reading it
        would otherwise wait forever) and whatever it still writes is read and dropped.
        """
        try:  # noqa: SIM105 - contextlib costs each per-call client ~0.4 ms to import
            self.stdin_sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        self._drain_until_exit()
        _, status = os.waitpid(self.pid, 0)
        self.stdin_sock.close()
        self.stdout_sock.close()
        if os.WIFSIGNALED(status):
            return SIGNAL_EXIT_BASE + os.WTERMSIG(status)
        return os.waitstatus_to_exitcode(status)

    def _drain_until_exit(self) -> None:
        """Read and drop the program's output until it exits (pidfd; else do nothing)."""
        import select

        try:
            pidfd = os.pidfd_open(self.pid)
        except (AttributeError, OSError):
            return
        try:
            open_fds = {self.stdout_sock.fileno(), self.stdin_sock.fileno()}
            while True:
                ready, _, _ = select.select([pidfd, *open_fds], [], [])
                if pidfd in ready:
                    return
                for fd in ready:
                    try:
                        if not os.read(fd, 65536):
                            open_fds.discard(fd)
                    except OSError:
                        open_fds.discard(fd)
        finally:
            os.close(pidfd)

    def abandon(self) -> None:
        """The call failed before its data phase: close our ends, leave the program be."""
        self.stdin_sock.close()
        self.stdout_sock.close()


def start(argv: Sequence[str], env: Mapping[str, str], saved: Sequence[int]) -> LocalProgram:
    """Start LOCAL_PROGRAM (see the module docstring); OSError when fork fails."""
    sys.stdout.flush()
    sys.stderr.flush()
    return LocalProgram(argv, env, saved)
