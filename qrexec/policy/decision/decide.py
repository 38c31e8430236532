"""From a §6.1 query to a §6.1 response: evaluate, ask, notify, audit.

This is the part of the policy daemon that is neither parsing (:mod:`.wire`) nor
evaluation (the pure core, :meth:`Policy.evaluate`) nor sockets (:mod:`.daemon`): it fetches
the current policy and system info, turns an ``ask`` into a question for the user (with a
timeout; no or an invalid answer is a deny), sends policy.Notify when the rule says so,
writes exactly one audit record, and shapes the answer for qrexec-daemon. The daemon,
``qrexec-policy-exec`` and policy.EvalSimple/EvalGUI all go through :meth:`Decider.decide`,
so they cannot disagree.

It never raises for a bad request or a broken dependency: anything unexpected becomes a
deny with an ``error`` audit record.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Final

from qrexec.errors import QrexecError, SystemInfoError
from qrexec.policy.decision.ask import AskPrompt, Prompter, parse_ask_answer
from qrexec.policy.decision.audit import AuditLog, AuditRecord, AuditResult
from qrexec.policy.decision.notify import LogNotifier, Notification, Notifier, NotifyResolution
from qrexec.policy.decision.wire import DENY, PolicyQuery, PolicyResponse, allow_response
from qrexec.policy.engine.evaluation import resolve_ask, resolve_ask_assume_yes
from qrexec.policy.engine.model import Action, Request, Resolution
from qrexec.policy.engine.system_info import SystemInfo, SystemInfoSource
from qrexec.policy.loading.reload import PolicySource

log = logging.getLogger(__name__)

DEFAULT_ASK_TIMEOUT: Final = 60.0
DISPVM_PREFIX: Final = "@dispvm:"


@dataclass
class Outcome:
    """What :meth:`Decider.decide` concluded, before it became wire bytes."""

    response: PolicyResponse
    result: AuditResult
    resolution: Resolution | None
    reason: str


@dataclass
class Decider:
    policy: PolicySource
    system_info: SystemInfoSource
    prompter: Prompter
    audit: AuditLog
    notifier: Notifier = field(default_factory=LogNotifier)
    ask_timeout: float = DEFAULT_ASK_TIMEOUT
    _notifications: set[asyncio.Task[None]] = field(default_factory=set, repr=False)

    async def decide(self, query: PolicyQuery, *, channel: str) -> PolicyResponse:
        """The answer for ``query``; writes one audit record."""
        return (await self.outcome(query, channel=channel)).response

    async def outcome(self, query: PolicyQuery, *, channel: str) -> Outcome:
        try:
            outcome, request, info = await self._decide(query)
        except Exception as exc:  # A bug must cost one call, never the daemon.
            log.exception("error while deciding %s", query)
            outcome = Outcome(DENY, "error", None, f"internal error: {exc!r}")
            request, info = None, None
        self._audit(query, outcome, channel)
        if not query.just_evaluate:
            self._maybe_notify(outcome, query, request, info)
        return outcome

    async def _decide(
        self, query: PolicyQuery
    ) -> tuple[Outcome, Request | None, SystemInfo | None]:
        try:
            info = self.system_info.get_system_info()
        except SystemInfoError as exc:
            return Outcome(DENY, "error", None, f"system info unavailable: {exc}"), None, None
        source = query.source
        policy_source: str | None = None
        if query.requested_source and query.requested_source != query.source:
            refusal = _relay_refusal(query, info)
            if refusal is not None:
                return Outcome(DENY, "deny", None, refusal), None, info
            source = policy_source = query.requested_source
        request = Request.from_service_and_arg(
            query.service_and_arg, source, query.intended_target or "@default"
        )
        resolution = self.policy.get_policy().evaluate(request, info)
        asked = resolution.action is Action.ASK
        if asked:
            resolution = await self._resolve_ask(query, resolution, info)
        if resolution.action is not Action.ALLOW:
            result: AuditResult = "ask-denied" if asked else "deny"
            return Outcome(DENY, result, resolution, resolution.reason), request, info
        response = _allow(resolution, query, info, policy_source)
        response.encode()  # validates now, so a bad value is an audited error, not a hang-up
        result = "ask-allowed" if asked else "allow"
        return Outcome(response, result, resolution, resolution.reason), request, info

    async def _resolve_ask(
        self, query: PolicyQuery, resolution: Resolution, info: SystemInfo
    ) -> Resolution:
        if query.just_evaluate or query.assume_yes_for_ask:
            yes = resolve_ask_assume_yes(resolution, info)
            if yes.action is Action.ALLOW or not query.just_evaluate:
                return yes
            # Just evaluating (policy.EvalSimple): ask counts as yes even when no target
            # stands out, so answer with the first candidate.
            return resolve_ask(resolution, resolution.targets_for_ask[0], info)
        request = resolution.request
        guivm = info.guivm_for(request.source) or "dom0"
        prompt = AskPrompt(
            source=request.source,
            service=request.service,
            argument=request.argument,
            targets=resolution.targets_for_ask,
            default_target=resolution.default_target or "",
            icons=_icons(resolution, info),
            requested_target=request.target,
        )
        try:
            async with asyncio.timeout(self.ask_timeout):
                raw = await self.prompter.ask(prompt, guivm)
            chosen = parse_ask_answer(raw, prompt)
        except TimeoutError:
            return _denied(resolution, f"no answer from {guivm} within {self.ask_timeout:g} s")
        except (QrexecError, OSError) as exc:
            return _denied(resolution, f"could not ask {guivm}: {exc}")
        if chosen is None:
            # The user made this decision just now: no need to notify them of it.
            return _denied(resolution, f"user in {guivm} said no", notify=False)
        return resolve_ask(resolution, chosen, info)

    def _audit(self, query: PolicyQuery, outcome: Outcome, channel: str) -> None:
        res = outcome.resolution
        resp = outcome.response
        self.audit.record(
            AuditRecord(
                channel=channel,
                source=query.source,
                requested_source=query.requested_source or None,
                requested_target=query.intended_target or "@default",
                target=resp.target,
                service=query.service,
                argument=query.argument,
                result=outcome.result,
                user=resp.user,
                rule=str(res.rule) if res is not None and res.rule is not None else None,
                reason=outcome.reason,
                just_evaluate=query.just_evaluate,
                assumed_yes=query.assume_yes_for_ask and outcome.result.startswith("ask-"),
            )
        )

    def _maybe_notify(
        self,
        outcome: Outcome,
        query: PolicyQuery,
        request: Request | None,
        info: SystemInfo | None,
    ) -> None:
        """§6.4: deny unless notify=no, allow only with notify=yes, and failures always
        (as ``fail``, to the source's GuiVM if known, else dom0)."""
        res = outcome.resolution
        kind: NotifyResolution
        if outcome.result == "error":
            kind, wanted = "fail", True
            target = query.intended_target or "@default"
        elif res is None or request is None:
            return  # refused before evaluation (relay check): nothing the user asked for
        elif outcome.response.allowed:
            kind, target, wanted = "allow", res.target or request.target, res.notify
        else:
            kind, target, wanted = "deny", request.target, res.notify
        if not wanted:
            return
        guivm = (info.guivm_for(query.source) if info is not None else None) or "dom0"
        note = Notification(kind, query.service, query.argument, query.source, target)
        task = asyncio.get_running_loop().create_task(self._notify(note, guivm))
        self._notifications.add(task)
        task.add_done_callback(self._notifications.discard)

    async def _notify(self, note: Notification, guivm: str) -> None:
        try:
            async with asyncio.timeout(self.ask_timeout):
                await self.notifier.notify(note, guivm)
        except (QrexecError, OSError, TimeoutError) as exc:
            log.warning("policy.Notify to %s failed: %s", guivm, exc or type(exc).__name__)

    async def flush_notifications(self) -> None:
        """Wait for notifications still being sent (one-shot programs call this at exit)."""
        if self._notifications:
            await asyncio.gather(*self._notifications, return_exceptions=True)


def _denied(resolution: Resolution, why: str, *, notify: bool = True) -> Resolution:
    return Resolution.deny(
        resolution.request, f"{resolution.reason}: {why}", rule=resolution.rule, notify=notify
    )


def _relay_refusal(query: PolicyQuery, info: SystemInfo) -> str | None:
    """A call relayed on behalf of another qube (v4 ``requested_source``) is evaluated as
    that qube only when it is a RemoteVM whose ``relayvm`` is the calling qube."""
    remote = info.get(query.requested_source or "")
    if remote is None:
        return f"unknown requested source {query.requested_source!r}"
    if remote.type != "RemoteVM" or remote.relayvm != query.source:
        return f"{query.source} may not call on behalf of {remote.name}"
    return None


def _icons(resolution: Resolution, info: SystemInfo) -> dict[str, str]:
    icons: dict[str, str] = {}
    for name in (resolution.request.source, *resolution.targets_for_ask):
        base = name.removeprefix(DISPVM_PREFIX)
        dom = info.get(base)
        if dom is not None and dom.icon:
            icons[name] = dom.icon
    return icons


def _allow(
    resolution: Resolution, query: PolicyQuery, info: SystemInfo, policy_source: str | None
) -> PolicyResponse:
    """Shape an ALLOW for qrexec-daemon (§6.1 "Allow response forms")."""
    target = resolution.target or ""
    service: str | None = None
    if target == "dom0":
        uuid = None
    elif target.startswith(DISPVM_PREFIX):
        base = info.get(target.removeprefix(DISPVM_PREFIX))
        uuid = base.uuid if base is not None else None
    else:
        dom = info.get(target)
        if dom is None:
            raise QrexecError(f"resolved target {target!r} is not in the system info")
        target, uuid = dom.name, dom.uuid
        if dom.is_admin:
            target, uuid = "dom0", None
        elif dom.type == "RemoteVM" and dom.relayvm and dom.transport_rpc:
            # Qubes Air: the call goes to the relay, which forwards it to the remote qube.
            relay = info.get(dom.relayvm)
            service = f"{dom.transport_rpc}+{dom.name}+{query.service}{query.argument}"
            target = dom.relayvm
            uuid = relay.uuid if relay is not None else None
    response = allow_response(
        target=target,
        target_uuid=uuid,
        user=resolution.user,
        autostart=resolution.autostart,
        requested_target=query.intended_target or "@default",
    )
    if service is None and policy_source is None:
        return response
    return PolicyResponse(
        result="allow",
        user=response.user,
        target=response.target,
        target_uuid=response.target_uuid,
        autostart=response.autostart,
        requested_target=response.requested_target,
        service=service,
        policy_source=policy_source,
    )
