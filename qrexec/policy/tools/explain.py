"""``qrexec-policy-explain SOURCE TARGET SERVICE+ARG``: why would dom0 decide what it decides?

Evaluates one call against the policy on disk (the same loading the policy daemon does) and
prints the decision, the resolved target and user, the deciding rule as ``file:line: text``,
the ask candidates, and the reason in words (for an unmatched call: which line to add where).
Exits 0 once it has explained, whatever the decision; 1 when the system info cannot be read;
2 on usage errors. Nothing is executed and nobody is asked.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from qrexec.errors import SystemInfoError
from qrexec.policy.engine.model import Action, Request, Resolution
from qrexec.policy.tools.cli_common import (
    add_policy_arguments,
    fail,
    load_from_args,
    quiet_logging,
    system_info_from_args,
)

PROG = "qrexec-policy-explain"


def explain_lines(res: Resolution) -> list[str]:
    """The human-readable explanation of one resolution."""
    req = res.request
    lines = [
        f"call: {req.source} -> {req.target or '@default'} {req.service_and_arg}",
        f"decision: {res.action.value}",
    ]
    if res.action is Action.ALLOW:
        lines.append(f"target: {res.target}")
    if res.action is not Action.DENY:
        lines.append(f"user: {res.user or 'DEFAULT'}")
        lines.append(f"autostart: {'yes' if res.autostart else 'no'}")
    if res.action is Action.ASK:
        lines.append(f"candidates: {' '.join(res.targets_for_ask)}")
        lines.append(f"default_target: {res.default_target or '(none)'}")
    lines.append(f"notify: {'yes' if res.notify else 'no'}")
    if res.rule is not None:
        lines.append(f"rule: {res.rule}: {res.rule.text}")
    else:
        lines.append("rule: (none)")
    lines.append(f"reason: {res.reason}")
    return lines


def explain_json(res: Resolution) -> str:
    return json.dumps(
        {
            "decision": res.action.value,
            "target": res.target,
            "user": res.user,
            "autostart": res.autostart,
            "notify": res.notify,
            "targets_for_ask": list(res.targets_for_ask),
            "default_target": res.default_target,
            "rule": None
            if res.rule is None
            else {"path": res.rule.path, "lineno": res.rule.lineno, "text": res.rule.text},
            "reason": res.reason,
        },
        indent=2,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    add_policy_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")
    parser.add_argument("source", metavar="SOURCE")
    parser.add_argument("target", metavar="TARGET", help="as the caller would send it")
    parser.add_argument("service", metavar="SERVICE+ARG")
    args = parser.parse_args(argv)
    quiet_logging()
    try:
        info = system_info_from_args(args, os.environ)
    except SystemInfoError as exc:
        return fail(PROG, str(exc))
    policy = load_from_args(args, os.environ)
    request = Request.from_service_and_arg(args.service, args.source, args.target)
    res = policy.evaluate(request, info)
    print(explain_json(res) if args.json else "\n".join(explain_lines(res)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
