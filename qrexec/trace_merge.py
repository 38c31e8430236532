"""Merge the trace lines of many processes into one timeline per call (see :mod:`qrexec.trace`).

Lines are linked into calls by their keys only - nothing was added to the wire for this:

* every key a line carries (``call=``, ``vchan=``, ``req=``) joins that line's keys into one
  call, so a client's lines (its own ``call=``) meet the daemon's and the agent's through the
  data vchan's ``vchan=S-C-P``, and a VM's trigger meets the daemon through ``req=``;
* a policy-daemon line (``src``/``svc``/``tgt``, no other key) joins the call whose
  ``daemon.trigger`` line has the same triple and is the latest one before it.

Each call prints as its lines in time order with the time since the call's first line and
the duration of each stage (the gap since the previous line). Lines without any key (a
daemon's ``client_connected``) are attached to nothing and listed apart when asked.

Usage: ``python -m qrexec.trace_merge FILE...`` (``-`` reads stdin); ``qrexec-sim trace``
does it for a testbed's trace file. Reads files; writes only to stdout.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

PREFIX = "qrexec-trace "
LINK_KEYS = ("call", "vchan", "req")


@dataclass(frozen=True)
class TraceLine:
    time_ns: int
    program: str
    pid: int
    stage: str
    fields: dict[str, str] = field(hash=False)

    @property
    def who(self) -> str:
        return f"{self.program}[{self.pid}]"

    def link_keys(self) -> list[str]:
        # A client's call number is only unique within its process.
        keys = [f"{name}={self.fields[name]}" for name in LINK_KEYS if name in self.fields]
        return [f"{k}@{self.pid}" if k.startswith("call=") else k for k in keys]


def parse_lines(lines: Iterable[str]) -> list[TraceLine]:
    """The trace lines among ``lines`` (anything else, e.g. log lines, is skipped)."""
    parsed = []
    for raw in lines:
        start = raw.find(PREFIX)
        if start < 0:
            continue
        parts = raw[start + len(PREFIX) :].split()
        if len(parts) < 4 or not parts[0].isdigit() or not parts[2].isdigit():
            continue
        fields = dict(p.split("=", 1) for p in parts[4:] if "=" in p)
        parsed.append(TraceLine(int(parts[0]), parts[1], int(parts[2]), parts[3], fields))
    parsed.sort(key=lambda line: line.time_ns)
    return parsed


class _Union:
    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, key: str) -> str:
        self.parent.setdefault(key, key)
        while self.parent[key] != key:
            self.parent[key] = self.parent[self.parent[key]]
            key = self.parent[key]
        return key

    def join(self, a: str, b: str) -> None:
        self.parent[self.find(a)] = self.find(b)


def _policy_triple(line: TraceLine) -> tuple[str, str, str] | None:
    f = line.fields
    if "src" in f and "svc" in f and "tgt" in f:
        return f["src"], f["svc"], f["tgt"]
    return None


def _scoped_keys(lines: Sequence[TraceLine]) -> list[list[str]]:
    """Each line's keys, qualified by the use of the port or request id they belong to.

    Ports and agent request ids are reused by later calls; a new use begins where a daemon
    allocates the port (``daemon.port_allocated``) or an agent forwards a trigger (or a
    daemon receives one that no traced agent forwarded).
    """
    epoch: dict[str, int] = {}
    seen_daemon_trigger: dict[str, bool] = {}
    scoped = []
    for line in lines:
        keys = line.link_keys()
        for key in keys:
            if key.startswith("vchan=") and line.stage == "daemon.port_allocated":
                epoch[key] = epoch.get(key, 0) + 1
            elif key.startswith("req=") and line.stage == "agent.trigger_forwarded":
                epoch[key] = epoch.get(key, 0) + 1
                seen_daemon_trigger[key] = False
            elif key.startswith("req=") and line.stage == "daemon.trigger":
                if seen_daemon_trigger.get(key, True):
                    epoch[key] = epoch.get(key, 0) + 1
                seen_daemon_trigger[key] = True
        scoped.append([f"{key}#{epoch.get(key, 0)}" for key in keys])
    return scoped


def group_calls(lines: Sequence[TraceLine]) -> tuple[list[list[TraceLine]], list[TraceLine]]:
    """The calls (each a time-ordered list of lines) and the lines linked to none."""
    union = _Union()
    scoped = _scoped_keys(lines)
    for keys in scoped:
        for other in keys[1:]:
            union.join(keys[0], other)
    # Policy-daemon lines: the latest daemon.trigger with the same question before them.
    anchor: dict[int, str] = {}
    triggers: list[tuple[TraceLine, str]] = [
        (line, keys[0])
        for line, keys in zip(lines, scoped, strict=True)
        if line.stage == "daemon.trigger" and keys
    ]
    for index, line in enumerate(lines):
        triple = _policy_triple(line)
        if triple is None or line.link_keys():
            continue
        best = None
        for trigger, trigger_key in triggers:
            if trigger.time_ns <= line.time_ns and _policy_triple(trigger) == triple:
                best = trigger_key
        if best is not None:
            anchor[index] = best
    calls: dict[str, list[TraceLine]] = {}
    loose: list[TraceLine] = []
    for index, line in enumerate(lines):
        keys = scoped[index]
        key: str | None = keys[0] if keys else anchor.get(index)
        if key is None:
            loose.append(line)
            continue
        calls.setdefault(union.find(key), []).append(line)
    return sorted(calls.values(), key=lambda c: c[0].time_ns), loose


def format_call(call: Sequence[TraceLine]) -> str:
    """One call as a table: ms since start, ms since the previous stage, who, what."""
    start = call[0].time_ns
    previous = start
    keys = sorted({k.split("@")[0] for line in call for k in line.link_keys() if "vchan" in k})
    out = [f"call {' '.join(keys) or '(no vchan)'}: {(call[-1].time_ns - start) / 1e6:.3f} ms"]
    out.append(f"{'at ms':>9} {'+ms':>8}  {'process':<28} stage")
    for line in call:
        extra = " ".join(
            f"{k}={v}" for k, v in line.fields.items() if k not in ("call", "vchan", "req")
        )
        out.append(
            f"{(line.time_ns - start) / 1e6:9.3f} {(line.time_ns - previous) / 1e6:8.3f}"
            f"  {line.who:<28} {line.stage} {extra}".rstrip()
        )
        previous = line.time_ns
    return "\n".join(out)


def merge(texts: Iterable[str], *, show_loose: bool = False) -> str:
    lines = parse_lines(line for text in texts for line in text.splitlines())
    calls, loose = group_calls(lines)
    parts = [format_call(call) for call in calls]
    if show_loose and loose:
        parts.append("unlinked lines:\n" + "\n".join(f"  {ln.who} {ln.stage}" for ln in loose))
    return "\n\n".join(parts) + ("\n" if parts else "")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m qrexec.trace_merge", description="merge qrexec trace lines into timelines"
    )
    parser.add_argument("files", nargs="+", help="trace files or logs ('-' for stdin)")
    parser.add_argument("--loose", action="store_true", help="also list unlinked lines")
    args = parser.parse_args(argv)
    texts = []
    for name in args.files:
        if name == "-":
            texts.append(sys.stdin.read())
        else:
            with open(name, encoding="utf-8", errors="replace") as handle:
                texts.append(handle.read())
    sys.stdout.write(merge(texts, show_loose=args.loose))
    return 0


if __name__ == "__main__":
    sys.exit(main())
