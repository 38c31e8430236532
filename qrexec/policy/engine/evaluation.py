"""Deciding one request against an ordered list of rules (spec §6.2 "Evaluation").

A requested target that cannot be a call's target (``@anyvm``, ``@dispvm:`` of something
that is not a disposable template…) is refused before any rule is read. Then the first
matching rule wins; allow resolves its target (``@dispvm`` → ``@dispvm:NAME``, ``@adminvm`` →
``dom0``) and refuses ``@default``, loopback and, with ``autostart=no``, a target that is not
running (notifying as the rule says); ask builds its candidate list by scanning every rule
for the same service, argument and source bottom-up, and with ``autostart=no`` keeps only
running qubes. These are Qubes R4.3's decisions; docs/decisions.md lists where we differ on
purpose. Also here: turning the user's answer to an ask into the final decision. Does no
I/O; :class:`qrexec.policy.engine.policy.Policy` feeds it the rules.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Sequence

from qrexec.policy.engine.model import Action, Request, Resolution
from qrexec.policy.engine.rules import Rule
from qrexec.policy.engine.system_info import ADMIN_VM_NAME, DomainInfo, SystemInfo
from qrexec.policy.engine.tokens import (
    DEFAULT,
    DISPVM,
    DISPVM_PREFIX,
    InvalidTarget,
    canonical_request_target,
    expand_target,
    matches_source,
    matches_target,
    resolve_redirect,
)

log = logging.getLogger(__name__)

_SERVICE = re.compile(r"^[A-Za-z0-9._-]+$")
_ARGUMENT = re.compile(r"^\+[A-Za-z0-9+._-]*$")

#: Builds the deny reason when no rule matched (the policy knows which file to suggest).
NoMatchReason = Callable[[Request, DomainInfo, str], str]


def _source_of(request: Request, info: SystemInfo) -> DomainInfo | None:
    name = ADMIN_VM_NAME if request.source == "@adminvm" else request.source
    return info.get(name) if name else None


def check_request(request: Request, info: SystemInfo) -> tuple[DomainInfo, str] | str:
    """(source, canonical requested target) or the reason the request cannot be evaluated."""
    if not _SERVICE.match(request.service):
        return f"invalid service name {request.service!r}"
    if not _ARGUMENT.match(request.argument):
        return f"invalid service argument {request.argument!r}"
    source = _source_of(request, info)
    if source is None:
        return f"unknown source qube {request.source!r}"
    target = canonical_request_target(request.target, source, info)
    if isinstance(target, InvalidTarget):
        return f"invalid intended target: {target.reason}"
    return source, target


def find_matching_rule(
    rules: Iterable[Rule], request: Request, source: DomainInfo, target: str, info: SystemInfo
) -> Rule | None:
    """The first rule matching service, argument, source and canonical target."""
    for rule in rules:
        if (
            rule.matches_service(request.service, request.argument)
            and matches_source(rule.source, source, info)
            and matches_target(rule.target, target, source, info)
        ):
            return rule
    return None


def final_target(value: str, source: DomainInfo, info: SystemInfo) -> tuple[str | None, str]:
    """Resolve an allowed target; returns (target, "") or (None, why it is refused).

    Whether the target runs (``autostart=no``) is :func:`autostart_refusal`'s question.
    """
    if value == DEFAULT:
        return None, "no target was given by the caller or by the policy (target=)"
    if value == DISPVM:
        if not source.default_dispvm:
            return None, f"@dispvm requested but {source.name} has no default_dispvm"
        value = DISPVM_PREFIX + source.default_dispvm
    if value.startswith(DISPVM_PREFIX):
        base = info.get(value[len(DISPVM_PREFIX) :])
        if base is None or not base.template_for_dispvms:
            return None, f"{value}: not an existing disposable template"
        return DISPVM_PREFIX + base.name, ""
    dom = info.get(value)
    if dom is None:
        return None, f"target {value!r} does not exist"
    if dom.name == source.name:
        return None, f"loopback call refused ({source.name} calling itself)"
    return dom.name, ""


def is_running(target: str, info: SystemInfo) -> bool:
    """Does the resolved ``target`` run now? dom0 always does; a new disposable never does."""
    if target.startswith(DISPVM_PREFIX):
        return False
    dom = info.get(target)
    return dom is not None and dom.is_running


def autostart_refusal(target: str, info: SystemInfo) -> str:
    """The deny reason for a resolved ``target`` that ``autostart=no`` rules out."""
    if target.startswith(DISPVM_PREFIX):
        return "autostart=no, and a new disposable is never running"
    return f"autostart=no, and {target} is not running"


def collect_targets_for_ask(
    rules: Sequence[Rule], request: Request, source: DomainInfo, info: SystemInfo
) -> list[str]:
    """Candidates for an ask without ``target=`` (§6.2 evaluation steps 4-5).

    Every rule for this service, argument and source counts regardless of its target, read
    bottom-up so that earlier rules win: allow/ask add what their (redirected) target stands
    for, deny removes it. The source itself and internal qubes are never offered.
    """
    targets: set[str] = set()
    for rule in reversed(rules):
        if not rule.matches_service(request.service, request.argument):
            continue
        if not matches_source(rule.source, source, info):
            continue
        if rule.redirect is not None:
            redirected = resolve_redirect(rule.redirect, source, info)
            if redirected == DISPVM:
                redirected = (
                    DISPVM_PREFIX + source.default_dispvm if source.default_dispvm else None
                )
            expansion = {redirected} if redirected is not None else set()
        else:
            expansion = set(expand_target(rule.target, source, info))
        if rule.action is Action.DENY:
            targets -= expansion
        else:
            targets |= expansion

    def offered(target: str) -> bool:
        name = target.removeprefix(DISPVM_PREFIX)
        dom = info.get(name)
        if dom is None or target == source.name or dom.internal:
            return False
        # "@dispvm:X" only when X is a disposable template (a redirect or a default_dispvm
        # can name any qube).
        return name == target or dom.template_for_dispvms

    return sorted(t for t in targets if offered(t))


def decide(
    rules: Sequence[Rule],
    request: Request,
    info: SystemInfo,
    no_match: NoMatchReason,
) -> Resolution:
    """Evaluate ``request``; ``rules`` must hold every rule that can match its service
    (in policy order), since ask scans them all for candidates."""
    checked = check_request(request, info)
    if isinstance(checked, str):
        log.warning(
            "%s: %s refused before any rule: %s",
            request.source,
            request.service_and_arg,
            checked,
        )
        return Resolution.deny(request, checked)
    source, target = checked
    if target == source.name:
        return Resolution.deny(request, f"loopback call refused ({source.name} calling itself)")
    rule = find_matching_rule(rules, request, source, target, info)
    if rule is None:
        return Resolution.deny(request, no_match(request, source, target))
    where = f"{rule.ref}: {rule.ref.text}"
    if rule.action is Action.DENY:
        return Resolution.deny(request, f"denied by {where}", rule=rule.ref, notify=rule.notify)
    if rule.action is Action.ALLOW:
        wanted = target
        if rule.redirect is not None:
            redirected = resolve_redirect(rule.redirect, source, info)
            if redirected is None:
                return Resolution.deny(
                    request, f"{where}: target={rule.redirect} does not exist", rule=rule.ref
                )
            wanted = redirected
        resolved, why = final_target(wanted, source, info)
        if resolved is None:
            return Resolution.deny(request, f"{where}: {why}", rule=rule.ref)
        if not rule.autostart and not is_running(resolved, info):
            # The rule's own notify (default no), as Qubes: this deny is the rule's choice.
            why = autostart_refusal(resolved, info)
            return Resolution.deny(request, f"{where}: {why}", rule=rule.ref, notify=rule.notify)
        return Resolution.allow(
            request,
            resolved,
            user=rule.user,
            autostart=rule.autostart,
            notify=rule.notify,
            rule=rule.ref,
            reason=f"allowed by {where}",
        )
    return _ask(rule, rules, request, source, info, where)


def _ask(
    rule: Rule,
    rules: Sequence[Rule],
    request: Request,
    source: DomainInfo,
    info: SystemInfo,
    where: str,
) -> Resolution:
    if rule.redirect is not None:
        candidates: list[str] = []
        redirected = resolve_redirect(rule.redirect, source, info)
        if redirected is not None:
            resolved, _ = final_target(redirected, source, info)
            candidates = [resolved] if resolved is not None else []
    else:
        candidates = collect_targets_for_ask(rules, request, source, info)
    if not rule.autostart:
        # Qubes offers only what already runs when the rule says autostart=no.
        candidates = [c for c in candidates if is_running(c, info)]
    if not candidates:
        return Resolution.deny(
            request, f"{where}: ask, but no target is available to choose from", rule=rule.ref
        )
    default_target = None
    if rule.default_target is not None:
        value = resolve_redirect(rule.default_target, source, info)
        if value == DISPVM:
            value = DISPVM_PREFIX + source.default_dispvm if source.default_dispvm else None
        if value in candidates:
            default_target = value
        else:
            log.warning(
                "%s: default_target=%s is not among the candidates, ignored",
                rule.ref,
                rule.default_target,
            )
    return Resolution(
        action=Action.ASK,
        request=request,
        target=None,
        user=rule.user,
        autostart=rule.autostart,
        notify=rule.notify,
        default_target=default_target,
        targets_for_ask=tuple(candidates),
        rule=rule.ref,
        reason=f"ask by {where}",
    )


def resolve_ask(resolution: Resolution, chosen: str, info: SystemInfo) -> Resolution:
    """The decision after the user answered an ask with ``chosen`` (a candidate).

    A choice outside the candidate list (the GUI VM is not trusted either) is a deny; so is a
    target that ``autostart=no`` rules out at this point.
    """
    request = resolution.request
    if resolution.action is not Action.ASK:
        raise ValueError("resolve_ask() needs an ask resolution")
    if chosen not in resolution.targets_for_ask:
        return Resolution.deny(
            request, f"answer {chosen!r} is not one of the offered targets", rule=resolution.rule
        )
    source = _source_of(request, info)
    if source is None:
        return Resolution.deny(request, f"unknown source qube {request.source!r}")
    resolved, why = final_target(chosen, source, info)
    if resolved is None:
        return Resolution.deny(request, why, rule=resolution.rule)
    if not resolution.autostart and not is_running(resolved, info):
        # It stopped since it was offered; as for allow, the rule's notify applies.
        why = autostart_refusal(resolved, info)
        return Resolution.deny(request, why, rule=resolution.rule, notify=resolution.notify)
    return Resolution.allow(
        request,
        resolved,
        user=resolution.user,
        autostart=resolution.autostart,
        notify=resolution.notify,
        rule=resolution.rule,
        reason=f"{resolution.reason}; user chose {resolved}",
    )


def resolve_ask_assume_yes(resolution: Resolution, info: SystemInfo) -> Resolution:
    """``--assume-yes-for-ask``: the requested target if offered, else the default target."""
    source = _source_of(resolution.request, info)
    canonical = (
        canonical_request_target(resolution.request.target, source, info)
        if source is not None
        else DEFAULT
    )
    requested = canonical if isinstance(canonical, str) else DEFAULT
    if requested == DISPVM and source is not None and source.default_dispvm:
        requested = DISPVM_PREFIX + source.default_dispvm
    if requested in resolution.targets_for_ask:
        return resolve_ask(resolution, requested, info)
    if resolution.default_target is not None:
        return resolve_ask(resolution, resolution.default_target, info)
    return Resolution.deny(
        resolution.request,
        f"{resolution.reason}: assumed yes, but no target was requested and none is default",
        rule=resolution.rule,
    )
