"""``qrexec-policy-graph``: draw which qube may call which service in which qube (Graphviz DOT).

Every (source, requested target, service+argument) combination is evaluated against the
policy; each allowed call becomes an edge from the source to the *resolved* target, labelled
with the service. With ``--include-ask``, calls that would ask become dashed edges to each
candidate. Services default to those the policy names (plus their explicit arguments);
sources and requested targets default to every qube of the system info (targets also
``@default`` and ``@dispvm``, so redirections show up). ``--output F`` writes DOT to F, or
renders it through Graphviz ``dot`` when F ends in .svg/.png/.pdf/.ps/.jpg; a missing ``dot``
is a clear error. Exit 0 on success, 1 on errors.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from collections.abc import Iterable, Sequence

from qrexec.errors import SystemInfoError
from qrexec.policy.engine.model import Action, Request
from qrexec.policy.engine.policy import Policy
from qrexec.policy.engine.system_info import SystemInfo
from qrexec.policy.tools.cli_common import (
    add_policy_arguments,
    fail,
    load_from_args,
    quiet_logging,
    system_info_from_args,
)

PROG = "qrexec-policy-graph"
RENDERED_FORMATS = ("svg", "png", "pdf", "ps", "jpg")

Edge = tuple[str, str, str, bool, str]  # source, target, label, is_ask, rule


def _quote(text: str) -> str:
    """A DOT string literal; newlines become DOT's centred line break."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def service_calls(policy: Policy, services: Sequence[str] | None) -> list[tuple[str, str]]:
    """(service, argument) pairs to evaluate: the named or mentioned services, ``+`` and each
    argument a rule spells out."""
    names = list(services) if services else policy.services
    calls: set[tuple[str, str]] = set()
    for name in names:
        service, plus, arg = name.partition("+")
        if plus:
            calls.add((service, "+" + arg))
            continue
        calls.add((service, "+"))
        for rule in policy.rules_for(service):
            if rule.argument is not None:
                calls.add((service, rule.argument))
    return sorted(calls)


def collect_edges(
    policy: Policy,
    info: SystemInfo,
    *,
    sources: Sequence[str] | None = None,
    targets: Sequence[str] | None = None,
    services: Sequence[str] | None = None,
    include_ask: bool = False,
) -> list[Edge]:
    """Every allowed (and, optionally, asked) call as an edge, deduplicated and sorted."""
    all_names = [d.name for d in info]
    edges: set[Edge] = set()
    for service, argument in service_calls(policy, services):
        for source in sources or all_names:
            for target in targets or [*all_names, "@default", "@dispvm"]:
                res = policy.evaluate(Request(service, argument, source, target), info)
                label = service + ("" if argument == "+" else argument)
                rule = str(res.rule) if res.rule else ""
                if res.action is Action.ALLOW and res.target is not None:
                    edges.add((source, res.target, label, False, rule))
                elif res.action is Action.ASK and include_ask:
                    for candidate in res.targets_for_ask:
                        edges.add((source, candidate, label, True, rule))
    return sorted(edges)


def to_dot(edges: Iterable[Edge], *, skip_labels: bool = False, full_output: bool = False) -> str:
    """DOT text. ``skip_labels`` drops service names and merges parallel edges;
    ``full_output`` adds the deciding rule (file:line) to each label."""
    lines = ["digraph qrexec_policy {", "  node [shape=box];"]
    seen: set[tuple[str, str, bool]] = set()
    for source, target, label, is_ask, rule in edges:
        attrs = []
        if skip_labels:
            if (source, target, is_ask) in seen:
                continue
            seen.add((source, target, is_ask))
        else:
            text = f"{label}\n{rule}" if full_output and rule else label
            attrs.append(f"label={_quote(text)}")
        if is_ask:
            attrs.append("style=dashed")
        suffix = f" [{', '.join(attrs)}]" if attrs else ""
        lines.append(f"  {_quote(source)} -> {_quote(target)}{suffix};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def write_output(dot: str, output: str | None) -> str | None:
    """Write or render; returns an error message or None."""
    if output is None:
        sys.stdout.write(dot)
        return None
    ext = output.rsplit(".", 1)[-1].lower() if "." in output else ""
    if ext not in RENDERED_FORMATS:
        with open(output, "w", encoding="utf-8") as f:
            f.write(dot)
        return None
    dot_program = shutil.which("dot")
    if dot_program is None:
        return (
            f"cannot render {output}: Graphviz 'dot' is not installed "
            "(install the graphviz package, or write DOT with --output FILE.dot)"
        )
    proc = subprocess.run(
        [dot_program, f"-T{ext}", "-o", output],
        input=dot.encode(),
        capture_output=True,
        check=False,
    )
    if proc.returncode != 0:
        return f"dot failed ({proc.returncode}): {proc.stderr.decode(errors='replace').strip()}"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    add_policy_arguments(parser)
    parser.add_argument("--include-ask", action="store_true", help="also draw ask (dashed)")
    parser.add_argument("--source", nargs="+", metavar="QUBE", help="only these callers")
    parser.add_argument("--target", nargs="+", metavar="QUBE", help="only these requested targets")
    parser.add_argument("--service", nargs="+", metavar="SERVICE", help="only these services")
    parser.add_argument("--output", metavar="FILE", help=".dot, or .svg/.png/.pdf via Graphviz")
    parser.add_argument("--skip-labels", action="store_true", help="no service names on edges")
    parser.add_argument("--full-output", action="store_true", help="add the deciding rule")
    args = parser.parse_args(argv)
    quiet_logging()
    try:
        info = system_info_from_args(args, os.environ)
    except SystemInfoError as exc:
        return fail(PROG, str(exc))
    policy = load_from_args(args, os.environ)
    if policy.error is not None:
        return fail(PROG, f"policy does not load, every call is denied: {policy.error}")
    edges = collect_edges(
        policy,
        info,
        sources=args.source,
        targets=args.target,
        services=args.service,
        include_ask=args.include_ask,
    )
    error = write_output(
        to_dot(edges, skip_labels=args.skip_labels, full_output=args.full_output), args.output
    )
    return fail(PROG, error) if error else 0


if __name__ == "__main__":
    sys.exit(main())
