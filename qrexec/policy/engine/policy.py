"""A loaded policy: the ordered rules, indexed by service, and ``evaluate()``.

Rules are kept in file order. Because a rule either names one service or is ``*``, the rules
that can match a request are that service's rules merged, in original order, with the ``*``
ones; the merge is built once per service and cached, so a policy with thousands of rules for
other services costs a request no more than its wildcard rules (bench/bench_policy.py).

A policy that failed to load (any syntax error, a bad file name) denies everything and gives
the error text as the reason. This module does no I/O; loaders build Policy objects.
"""

from __future__ import annotations

import dataclasses
import heapq
from collections.abc import Iterable, Sequence

from qrexec.errors import PolicySyntaxError
from qrexec.policy.engine.evaluation import check_request, decide, find_matching_rule
from qrexec.policy.engine.model import Request, Resolution
from qrexec.policy.engine.rules import Rule
from qrexec.policy.engine.system_info import DomainInfo, SystemInfo
from qrexec.policy.engine.tokens import DEFAULT, DISPVM, DISPVM_PREFIX


@dataclasses.dataclass(frozen=True, slots=True)
class NoMatchHint:
    """Where an admin would add a line to allow a call nothing matched.

    ``style`` is ``modern`` (``path`` is a policy.d file, e.g. 30-user.policy) or ``2011``
    (``path`` is the 2011 policy directory; the file is named after the service), as the
    seed's "dom0 will ask you to create one".
    """

    style: str
    path: str

    def reason(self, request: Request, source: DomainInfo, target: str) -> str:
        argument = "*" if request.argument == "+" else request.argument
        if self.style == "2011":
            dest = {DEFAULT: "anyvm", DISPVM: "dispvm", "dom0": "dom0"}.get(target, target)
            dest = "dispvm" if dest.startswith(DISPVM_PREFIX) else dest
            name = request.service if request.argument == "+" else request.service_and_arg
            return (
                f"no rule matched; to allow, add the line `{source.name} {dest} allow` to "
                f"{self.path.rstrip('/')}/{name} (`anyvm anyvm ask` asks every time)"
            )
        if target == DEFAULT:
            line = f"{request.service} {argument} {source.name} @default allow target=QUBE"
        else:
            shown = "@adminvm" if target == "dom0" else target
            line = f"{request.service} {argument} {source.name} {shown} allow"
        return f"no rule matched; to allow, add `{line}` to {self.path}"


def _plain_reason(request: Request, source: DomainInfo, target: str) -> str:
    return "no rule matched"


class Policy:
    """Rules plus everything needed to explain decisions and notice changes.

    ``sources`` names every file and directory the policy was read from (including ones that
    were looked for and missing), so a daemon can reload only when one of them changed.
    """

    def __init__(
        self,
        rules: Iterable[Rule],
        *,
        error: PolicySyntaxError | None = None,
        sources: Iterable[str] = (),
        hint: NoMatchHint | None = None,
    ) -> None:
        self.rules: tuple[Rule, ...] = tuple(rules)
        self.error = error
        self.sources: frozenset[str] = frozenset(sources)
        self.hint = hint
        self._wildcard: list[tuple[int, Rule]] = []
        self._specific: dict[str, list[tuple[int, Rule]]] = {}
        for index, rule in enumerate(self.rules):
            if rule.service is None:
                self._wildcard.append((index, rule))
            else:
                self._specific.setdefault(rule.service, []).append((index, rule))
        self._wildcard_rules: tuple[Rule, ...] = tuple(r for _, r in self._wildcard)
        self._merged: dict[str, tuple[Rule, ...]] = {}

    @classmethod
    def failed(cls, error: PolicySyntaxError, sources: Iterable[str] = ()) -> Policy:
        """A policy that denies everything because loading failed with ``error``."""
        return cls((), error=error, sources=sources)

    def rules_for(self, service: str) -> Sequence[Rule]:
        """Rules that can match ``service``, in policy order."""
        merged = self._merged.get(service)
        if merged is not None:
            return merged
        specific = self._specific.get(service)
        if specific is None:
            return self._wildcard_rules
        merged = tuple(r for _, r in heapq.merge(specific, self._wildcard, key=lambda p: p[0]))
        self._merged[service] = merged
        return merged

    @property
    def services(self) -> list[str]:
        """Services named explicitly by some rule (for graphs)."""
        return sorted(self._specific)

    def evaluate(self, request: Request, system_info: SystemInfo) -> Resolution:
        """The decision for ``request`` (never raises for bad requests: those are denied)."""
        if self.error is not None:
            return Resolution.deny(request, f"policy failed to load: {self.error}")
        rules = self.rules_for(request.service)
        no_match = self.hint.reason if self.hint is not None else _plain_reason
        return decide(rules, request, system_info, no_match)

    def find_rule(self, request: Request, system_info: SystemInfo) -> Rule | None:
        """The rule that decides ``request`` (None when none matches or it is invalid)."""
        if self.error is not None:
            return None
        checked = check_request(request, system_info)
        if isinstance(checked, str):
            return None
        source, target = checked
        rules = self.rules_for(request.service)
        return find_matching_rule(rules, request, source, target, system_info)
