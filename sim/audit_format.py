"""Policy audit records (one JSON object a line) as sentences a person reads.

Used by ``qrexec-sim logs --audit`` and the demo; reads nothing itself.
"""

from __future__ import annotations

import json


def format_audit_line(line: str) -> str:
    """One audit-log record as a readable sentence (raw text if it is not JSON)."""
    try:
        rec = json.loads(line)
    except json.JSONDecodeError:
        return line.rstrip("\n")
    target = rec.get("target") or "-"
    rule = rec.get("rule") or "no matching rule"
    return (
        f"{rec.get('result', '?'):11} {rec.get('service', '?')}{rec.get('argument', '')} "
        f"{rec.get('source', '?')} -> {rec.get('requested_target', '?')} (resolved {target}) "
        f"user={rec.get('user') or '-'} rule={rule}"
    )
