"""policy.Notify: telling the user about a decision (spec §6.4), through pluggable notifiers.

The body is JSON with ``resolution`` (``allow``, ``deny`` or ``fail``), ``service``,
``argument``, ``source`` and ``target``; the reply is empty. Sent on a deny unless the rule
said ``notify=no``, and on an allow when it said ``notify=yes`` — that rule is
:func:`should_notify`. Notifiers:

- ``log`` (default): one log line per notification; needs nothing else running.
- ``policy-notify``: the GuiVM's policy agent, like policy.Ask
  (:class:`qrexec.policy.decision.agent_client.PolicyAgentClient`).

Notifications are best effort: a failure is logged and never changes a decision.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Final, Literal, Protocol

from qrexec.errors import RemoteProtocolError
from qrexec.policy.decision.agent_client import PolicyAgentClient
from qrexec.policy.decision.ask import agent_json

log = logging.getLogger(__name__)

NotifyResolution = Literal["allow", "deny", "fail"]
MAX_NOTIFY_BYTES: Final = 65536


@dataclass(frozen=True, slots=True)
class Notification:
    resolution: NotifyResolution
    service: str
    argument: str
    source: str
    target: str

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "resolution": self.resolution,
                "service": self.service,
                "argument": self.argument,
                "source": self.source,
                "target": self.target,
            },
            sort_keys=True,
        ).encode("ascii")

    @classmethod
    def from_json(cls, raw: bytes) -> Notification:
        _, values = agent_json(
            raw,
            MAX_NOTIFY_BYTES,
            "notification",
            ("resolution", "service", "argument", "source", "target"),
        )
        resolution = values["resolution"]
        if resolution not in ("allow", "deny", "fail"):
            raise RemoteProtocolError(f"notification: unknown resolution {resolution[:32]!r}")
        return cls(
            resolution=resolution,  # type: ignore[arg-type]  # checked just above
            service=values["service"],
            argument=values["argument"],
            source=values["source"],
            target=values["target"],
        )


def should_notify(resolution: NotifyResolution, notify_flag: bool) -> bool:
    """The §6.4 rule. ``notify_flag`` is the deciding rule's notify= (defaults: yes for deny,
    no for allow — already applied by the policy core). Failures always notify."""
    if resolution == "fail":
        return True
    return notify_flag


class Notifier(Protocol):
    async def notify(self, notification: Notification, guivm: str) -> None: ...


class LogNotifier:
    """The default: notifications become log lines."""

    async def notify(self, notification: Notification, guivm: str) -> None:
        n = notification
        log.info("notify %s: %s %s%s from %s to %s", guivm, n.resolution.upper(), n.service,
                 n.argument, n.source, n.target)  # fmt: skip


class AgentNotifier:
    """policy.Notify in the GuiVM's policy agent."""

    def __init__(self, client: PolicyAgentClient) -> None:
        self.client = client

    async def notify(self, notification: Notification, guivm: str) -> None:
        await self.client.call(guivm, "policy.Notify", notification.to_json(), max_reply=4096)


NOTIFIER_SPECS: Final = "log | policy-notify"


def make_notifier(spec: str, client: PolicyAgentClient) -> Notifier:
    if spec == "log":
        return LogNotifier()
    if spec == "policy-notify":
        return AgentNotifier(client)
    raise ValueError(f"unknown notifier {spec!r}; expected {NOTIFIER_SPECS}")
