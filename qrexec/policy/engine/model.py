"""The values policy evaluation takes and returns: requests, actions, rule references, resolutions.

These are plain frozen records shared by the pure core, the loaders, the policy daemon and the
tools, so every side agrees on one shape (CONTRACTS.md, "Policy"). This module does no I/O and
holds no policy logic.
"""

from __future__ import annotations

import dataclasses
import enum


@dataclasses.dataclass(frozen=True, slots=True)
class Request:
    """One call to decide, as qrexec-daemon reports it.

    ``argument`` includes the leading ``+`` (just ``+`` when the caller gave none); ``target``
    is the target exactly as the caller sent it (``vm2``, ``@default``, ``@dispvm:x``,
    ``uuid:…``); an empty target means ``@default``.
    """

    service: str
    argument: str
    source: str
    target: str

    @classmethod
    def from_service_and_arg(cls, service_and_arg: str, source: str, target: str) -> Request:
        """Split ``SERVICE+ARG`` the way qrexec does: at the first ``+``."""
        service, plus, argument = service_and_arg.partition("+")
        return cls(service=service, argument=plus + argument or "+", source=source, target=target)

    @property
    def service_and_arg(self) -> str:
        """``SERVICE+ARG`` (``SERVICE+`` when there is no argument, as qrexec sends it)."""
        return self.service + self.argument


class Action(enum.Enum):
    """What a rule (and a resolution) says about a call."""

    ALLOW = "allow"
    DENY = "deny"
    ASK = "ask"


@dataclasses.dataclass(frozen=True, slots=True)
class RuleRef:
    """Where a rule came from: printed as ``path:lineno``, like every Qubes policy tool does."""

    path: str
    lineno: int
    text: str

    def __str__(self) -> str:
        return f"{self.path}:{self.lineno}"


@dataclasses.dataclass(frozen=True, slots=True)
class Resolution:
    """The decision about one request.

    For ALLOW, ``target`` is resolved: ``@dispvm`` became ``@dispvm:NAME`` and ``@adminvm``
    became ``dom0``; it is never ``@default``. For ASK, ``targets_for_ask`` lists the
    candidates (never empty) and ``target`` is None until the user has chosen (see
    :func:`qrexec.policy.engine.evaluation.resolve_ask`). For DENY only ``notify``, ``rule`` and
    ``reason`` carry information. ``rule`` is None when no rule decided (nothing matched, the
    policy failed to load, or the request was refused before matching).
    """

    action: Action
    request: Request
    target: str | None
    user: str | None
    autostart: bool
    notify: bool
    default_target: str | None
    targets_for_ask: tuple[str, ...]
    rule: RuleRef | None
    reason: str

    @property
    def allowed(self) -> bool:
        """True for ALLOW only (ASK still needs an answer)."""
        return self.action is Action.ALLOW

    @classmethod
    def allow(
        cls,
        request: Request,
        target: str,
        *,
        user: str | None,
        autostart: bool,
        notify: bool,
        rule: RuleRef | None,
        reason: str,
    ) -> Resolution:
        """A granted call to the already resolved ``target``."""
        return cls(
            action=Action.ALLOW,
            request=request,
            target=target,
            user=user,
            autostart=autostart,
            notify=notify,
            default_target=None,
            targets_for_ask=(),
            rule=rule,
            reason=reason,
        )

    @classmethod
    def deny(
        cls, request: Request, reason: str, *, rule: RuleRef | None = None, notify: bool = True
    ) -> Resolution:
        """A refusal; ``reason`` says why in words a dom0 admin can act on."""
        return cls(
            action=Action.DENY,
            request=request,
            target=None,
            user=None,
            autostart=False,
            notify=notify,
            default_target=None,
            targets_for_ask=(),
            rule=rule,
            reason=reason,
        )
