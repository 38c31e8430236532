"""The policy audit log: one JSON line per decision, and only one.

Why JSON lines: the testbed's ``logs`` command, tests and admins' ``jq`` all read the same
file, and one record per line survives concurrent appends (each record is written with a
single ``write`` on an ``O_APPEND`` file, well under the size where appends could interleave).

Fields: ``time`` (UTC, ISO 8601), ``channel`` (which door the question came through:
``policy.sock``, ``exec``, ``policy.EvalSimple``, ``policy.EvalGUI``), ``source``,
``requested_source`` (v4 relays; null otherwise), ``requested_target``, ``target`` (the
resolved target; null on deny), ``service``, ``argument``, ``result`` (``allow``, ``deny``,
``ask-allowed``, ``ask-denied`` or ``error``), ``user``, ``rule`` (``file:line`` of the deciding
rule, or null), ``reason``, and ``just_evaluate`` / ``assumed_yes`` when set.

Destinations: a file path, ``-`` for stderr, or none (the decision still goes to the
``qrexec.policy.decision.audit`` logger at INFO, so nothing is lost with the default setup).
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import sys
from dataclasses import dataclass, fields
from typing import Final, Literal

log = logging.getLogger(__name__)

AuditResult = Literal["allow", "deny", "ask-allowed", "ask-denied", "error"]
RESULTS: Final = ("allow", "deny", "ask-allowed", "ask-denied", "error")


@dataclass(frozen=True, slots=True)
class AuditRecord:
    channel: str
    source: str
    requested_source: str | None
    requested_target: str
    target: str | None
    service: str
    argument: str
    result: AuditResult
    user: str | None
    rule: str | None
    reason: str
    just_evaluate: bool = False
    assumed_yes: bool = False

    def to_line(self, now: datetime.datetime | None = None) -> str:
        when = now or datetime.datetime.now(datetime.UTC)
        data: dict[str, object] = {"time": when.isoformat(timespec="milliseconds")}
        # Not dataclasses.asdict: it deep-copies every value and was most of the cost of a
        # decision. All fields are plain str/bool/None.
        for name in _FIELD_NAMES:
            data[name] = getattr(self, name)
        if not self.just_evaluate:
            del data["just_evaluate"]
        if not self.assumed_yes:
            del data["assumed_yes"]
        return json.dumps(data, ensure_ascii=True, separators=(",", ":")) + "\n"


_FIELD_NAMES: Final = tuple(f.name for f in fields(AuditRecord))


class AuditLog:
    """Appends :class:`AuditRecord` lines to ``path`` (``-`` = stderr, None = logger only)."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self._fd: int | None = None
        if path and path != "-":
            parent = os.path.dirname(path)
            if parent:
                os.makedirs(parent, exist_ok=True)
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)

    def record(self, rec: AuditRecord) -> None:
        line = rec.to_line()
        log.info("decision: %s", line.rstrip("\n"))
        try:
            if self._fd is not None:
                os.write(self._fd, line.encode("ascii"))
            elif self.path == "-":
                sys.stderr.write(line)
                sys.stderr.flush()
        except OSError as exc:
            # The decision stands (it is already in the process log); losing the audit file
            # must not turn into denying or allowing anything differently.
            log.error("audit log %s: cannot write: %s", self.path, exc.strerror)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def read_audit_log(path: str) -> list[dict[str, object]]:
    """All records of an audit file (for tools and tests)."""
    with open(path, encoding="ascii") as f:
        return [json.loads(line) for line in f if line.strip()]
