"""Starting, checking and stopping the testbed's processes, by pid and never by name.

A process is recorded with its pid *and* its start time (from ``/proc/PID/stat``), so a
pid that the kernel handed to someone else after our process died is never signalled.
Each process is started in a session of its own: stopping it signals its whole process
group, which takes along service processes it left behind, and nothing else.

This module knows nothing about qrexec; :mod:`qrexec.sim.testbed` says what to start.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

log = logging.getLogger(__name__)

#: How long a process gets to exit after SIGTERM before it is killed.
STOP_GRACE_SECONDS = 3.0


@dataclasses.dataclass
class ProcessRecord:
    """A process the testbed started: what it is, how to find it again, where it logs."""

    role: str
    domain: str
    pid: int
    start_ticks: int
    argv: list[str]
    log: str

    @property
    def label(self) -> str:
        """A short name for messages, e.g. ``agent vm1``."""
        return f"{self.role} {self.domain}"


def start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot, or None if it does not exist."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its end.
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[19])


def process_state(pid: int) -> str | None:
    """The one-letter state from /proc (R, S, Z...), or None if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2 :].split()[0]


def is_alive(record: ProcessRecord) -> bool:
    """True while the recorded process runs (a zombie counts as dead; a reused pid too)."""
    if start_ticks(record.pid) != record.start_ticks:
        return False
    return process_state(record.pid) not in (None, "Z", "X")


def status_kib(pid: int, field: str) -> int | None:
    """A KiB field of ``/proc/PID/status`` (``VmRSS``, ``VmHWM``...); None if it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_kib(pid: int) -> int | None:
    """Resident set size of a process in KiB (None if it is gone)."""
    return status_kib(pid, "VmRSS")


def spawn(
    role: str,
    domain: str,
    argv: Sequence[str],
    env: Mapping[str, str],
    log_path: Path,
    *,
    user: str | None = None,
) -> tuple[ProcessRecord, subprocess.Popen[bytes]]:
    """Start ``argv`` in its own session, stdout and stderr appended to ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log_file:
        proc = subprocess.Popen(
            list(argv),
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
            user=user,
        )
    ticks = start_ticks(proc.pid)
    record = ProcessRecord(
        role=role,
        domain=domain,
        pid=proc.pid,
        start_ticks=ticks if ticks is not None else -1,
        argv=list(argv),
        log=str(log_path),
    )
    log.debug("started %s: pid %d: %s", record.label, proc.pid, " ".join(argv))
    return record, proc


def _reap(pid: int) -> None:
    """Collect the exit status if the process is our child (otherwise init does it)."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def _signal_group(record: ProcessRecord, signum: int) -> None:
    """Signal the record's process group, after checking that the pid is still ours."""
    if start_ticks(record.pid) != record.start_ticks:
        return
    try:
        if os.getpgid(record.pid) == record.pid:
            os.killpg(record.pid, signum)
        else:
            os.kill(record.pid, signum)
    except ProcessLookupError:
        pass
    except PermissionError as exc:
        log.warning("cannot signal %s (pid %d): %s", record.label, record.pid, exc)


def stop(records: Sequence[ProcessRecord], grace: float = STOP_GRACE_SECONDS) -> None:
    """Stop every recorded process: SIGTERM, wait up to ``grace`` seconds, then SIGKILL.

    Processes that are already dead are only reaped; their process groups still get the
    signals (a dead daemon may have left a service running).
    """
    for record in records:
        _signal_group(record, signal.SIGTERM)
        _signal_group_leftovers(record, signal.SIGTERM)
    deadline = time.monotonic() + grace
    pending = list(records)
    while pending and time.monotonic() < deadline:
        for record in pending:
            _reap(record.pid)
        pending = [r for r in pending if is_alive(r)]
        if pending:
            time.sleep(0.02)
    for record in pending:
        log.warning("%s (pid %d) ignored SIGTERM; killing it", record.label, record.pid)
        _signal_group(record, signal.SIGKILL)
    for record in records:
        _signal_group_leftovers(record, signal.SIGKILL)
        _reap(record.pid)


def _signal_group_leftovers(record: ProcessRecord, signum: int) -> None:
    """Signal a process group whose leader is gone (its pgid is the recorded pid)."""
    if is_alive(record):
        return
    ticks = start_ticks(record.pid)
    if ticks is not None and ticks != record.start_ticks:
        return  # the pid now belongs to another process: its group is not ours
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(record.pid, signum)


def wait_for(
    predicate: Callable[[], bool],
    timeout: float,
    *,
    watch: Sequence[ProcessRecord] = (),
    what: str = "condition",
) -> None:
    """Poll ``predicate()`` until true; fail early when a watched process dies.

    Raises :class:`TimeoutError` naming ``what`` and :class:`RuntimeError` naming the
    process that died, so a failed start says why at once instead of after the timeout.
    """
    deadline = time.monotonic() + timeout
    delay = 0.005
    while not predicate():
        for record in watch:
            _reap(record.pid)
            if not is_alive(record):
                raise RuntimeError(
                    f"{record.label} (pid {record.pid}) exited while waiting for {what}; "
                    f"see {record.log}"
                )
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, 0.1)
