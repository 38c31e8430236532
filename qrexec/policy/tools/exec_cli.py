"""``qrexec-policy-exec`` (also ``qrexec-policy``): one policy decision from the command line.

Usage (spec §8)::

    qrexec-policy-exec [--assume-yes-for-ask] [--just-evaluate] [--path DIR]...
                       [--system-info FILE] [--audit-log FILE] [--ask-prompter SPEC] ...
                       [--] SOURCE TARGET SERVICE+ARG

Prints the §6.1 response lines on stdout (what qrexec-daemon's fallback parses) and exits
0 when the call is allowed, 1 otherwise (deny, a refused ask, or an error), 2 on a usage
error. Settings and environment are those of the daemon (:mod:`.decider_setup`).

The deprecated R4.0 form ``DOMID SOURCE TARGET SERVICE+ARG PROCESS_IDENT``, in which the
policy program itself started the call with ``qrexec-client``, is refused with a message:
every qrexec-daemon since R4.1 uses the three-argument form and does the call itself, and
keeping a second call path in the policy program would duplicate the daemon's logic.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

from qrexec.policy.decision.decider_setup import add_decider_arguments, build_decider
from qrexec.policy.decision.wire import PolicyQuery

log = logging.getLogger("qrexec.policy.exec")

DEPRECATED_FORM = (
    "the deprecated 5-argument form (DOMID SOURCE TARGET SERVICE+ARG PROCESS_IDENT) is not "
    "supported; use SOURCE TARGET SERVICE+ARG (qrexec-daemon R4.1+ makes the call itself)"
)


def build_parser(prog: str = "qrexec-policy-exec") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Evaluate qrexec policy for one call.")
    p.add_argument(
        "--assume-yes-for-ask",
        action="store_true",
        help="treat 'ask' as yes (the requested or default target)",
    )
    p.add_argument(
        "--just-evaluate",
        action="store_true",
        help="only evaluate: nobody is asked ('ask' counts as allow), nothing is notified",
    )
    p.add_argument(
        "--path",
        dest="policy_path",
        action="append",
        metavar="DIR",
        help="policy.d directory, upstream's name for --policy-path (repeatable)",
    )
    add_decider_arguments(p)
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("args", nargs="*", metavar="SOURCE TARGET SERVICE+ARG")
    return p


async def evaluate(args: argparse.Namespace, source: str, target: str, call: str) -> bool:
    decider = build_decider(args)
    query = PolicyQuery(
        source=source,
        intended_target=target,
        service_and_arg=call,
        assume_yes_for_ask=args.assume_yes_for_ask,
        just_evaluate=args.just_evaluate,
    )
    try:
        response = await decider.decide(query, channel="exec")
    finally:
        await decider.flush_notifications()
        decider.audit.close()
    sys.stdout.write("".join(line + "\n" for line in response.lines()))
    sys.stdout.flush()
    return response.allowed


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    prog = prog or os.path.basename(sys.argv[0]) or "qrexec-policy-exec"
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        stream=sys.stderr,
        format=f"{prog}: %(message)s",
    )
    if len(args.args) == 5:
        parser.exit(2, f"{prog}: {DEPRECATED_FORM}\n")
    if len(args.args) != 3:
        parser.error("expected SOURCE TARGET SERVICE+ARG")
    source, target, call = args.args
    try:
        allowed = asyncio.run(evaluate(args, source, target, call))
    except ValueError as exc:  # bad settings (prompter spec, timeout)
        parser.exit(2, f"{prog}: {exc}\n")
    raise SystemExit(0 if allowed else 1)


if __name__ == "__main__":
    main()
