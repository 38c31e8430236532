"""Asking the user about an ``ask`` rule: the prompt, the answer, and pluggable prompters.

The prompt is what the policy.Ask socket service receives (spec §6.4): JSON with
``source``, ``service``, ``argument`` (always starting with ``+``), ``targets``,
``default_target`` (or ``""``) and ``icons``. The answer is ``allow:<target>`` or ``deny``;
:func:`parse_ask_answer` is the one place that checks it, so every prompter — a remote GUI
agent, the dom0 terminal, a test script — is held to the same rule: the chosen target must be
one of the candidates, and anything else is a deny.

Prompters (``Prompter.ask(prompt, guivm) -> raw answer``):

- ``deny``: no way to ask; every ask is a deny.
- ``scripted:FILE``: answers from a rules file, re-read at each prompt (see
  :class:`ScriptedPrompter`); for the testbed and tests.
- ``terminal[:TTY]``: :mod:`qrexec.policy.decision.ask_terminal`, for an interactive dom0.
- ``policy-ask``: :mod:`qrexec.policy.decision.agent_client`, the real policy.Ask socket service.

:class:`QueuedPrompter` answers from an in-process list (unit tests). Timeouts are the
caller's business (the policy daemon wraps every prompt in one). This module does no I/O
except :class:`ScriptedPrompter` reading its file.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from qrexec.errors import RemoteProtocolError

log = logging.getLogger(__name__)

#: Prompts are small; a bigger body on the agent side is refused.
MAX_PROMPT_BYTES: Final = 65536
#: ``allow:`` + a target of at most 63 chars (+ ``@dispvm:`` prefix) and a newline.
MAX_ANSWER_BYTES: Final = 256


def agent_json(
    raw: bytes, limit: int, what: str, string_keys: Iterable[str]
) -> tuple[dict[str, Any], dict[str, str]]:
    """Decode a JSON object that a policy agent exchanges (policy.Ask, policy.Notify), at most
    ``limit`` bytes; returns it and its ``string_keys``, each checked to be a string."""
    if len(raw) > limit:
        raise RemoteProtocolError(f"{what} longer than {limit} bytes")
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RemoteProtocolError(f"{what} is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise RemoteProtocolError(f"{what} is not a JSON object")
    strings = {}
    for key in string_keys:
        value = data.get(key)
        if not isinstance(value, str):
            raise RemoteProtocolError(f"{what}: {key} must be a string")
        strings[key] = value
    return data, strings


@dataclass(frozen=True, slots=True)
class AskPrompt:
    """One question for the user. ``requested_target`` is not part of the JSON of §6.4; local
    prompters use it to pick a sensible "yes" target."""

    source: str
    service: str
    argument: str
    targets: tuple[str, ...]
    default_target: str = ""
    icons: Mapping[str, str] = field(default_factory=dict)
    requested_target: str = ""

    def to_json(self) -> bytes:
        data = {
            "source": self.source,
            "service": self.service,
            "argument": self.argument,
            "targets": list(self.targets),
            "default_target": self.default_target,
            "icons": dict(self.icons),
        }
        return json.dumps(data, sort_keys=True).encode("ascii")

    @classmethod
    def from_json(cls, raw: bytes) -> AskPrompt:
        """Parse and validate the JSON a policy agent receives."""
        data, strings = agent_json(
            raw, MAX_PROMPT_BYTES, "ask prompt", ("source", "service", "argument", "default_target")
        )
        if not strings["argument"].startswith("+"):
            raise RemoteProtocolError("ask prompt: argument must start with '+'")
        targets = data.get("targets")
        if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
            raise RemoteProtocolError("ask prompt: targets must be a list of strings")
        icons = data.get("icons", {})
        if not isinstance(icons, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in icons.items()
        ):
            raise RemoteProtocolError("ask prompt: icons must map names to strings")
        return cls(
            source=strings["source"],
            service=strings["service"],
            argument=strings["argument"],
            targets=tuple(targets),
            default_target=strings["default_target"],
            icons=icons,
        )

    def yes_target(self) -> str | None:
        """The target a plain "yes" means: the default target, else the requested target
        when it is a candidate, else the only candidate; None when the user must choose."""
        if self.default_target and self.default_target in self.targets:
            return self.default_target
        if self.requested_target in self.targets:
            return self.requested_target
        if len(self.targets) == 1:
            return self.targets[0]
        return None


def parse_ask_answer(raw: bytes, prompt: AskPrompt) -> str | None:
    """The chosen target, or None for deny. Invalid answers raise RemoteProtocolError
    (callers turn that into a deny with the reason logged)."""
    if len(raw) > MAX_ANSWER_BYTES:
        raise RemoteProtocolError(f"ask answer longer than {MAX_ANSWER_BYTES} bytes")
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise RemoteProtocolError("ask answer is not ASCII") from None
    text = text.removesuffix("\n")
    if text == "deny":
        return None
    verb, colon, target = text.partition(":")
    if verb != "allow" or not colon:
        raise RemoteProtocolError(f"ask answer {text[:64]!r} is neither allow:TARGET nor deny")
    if target not in prompt.targets:
        raise RemoteProtocolError(f"ask answer names {target[:64]!r}, which is not a candidate")
    return target


class Prompter(Protocol):
    """Shows ``prompt`` to the user of ``guivm`` and returns the raw answer bytes."""

    async def ask(self, prompt: AskPrompt, guivm: str) -> bytes: ...


class DenyPrompter:
    """For systems with no way to ask: every ask is a deny (logged)."""

    async def ask(self, prompt: AskPrompt, guivm: str) -> bytes:
        log.info("no prompter configured: denying %s%s from %s", prompt.service,
                 prompt.argument, prompt.source)  # fmt: skip
        return b"deny"


class QueuedPrompter:
    """In-process answers for tests: each prompt takes the next answer; ``None`` means "never
    answer" (exercises the timeout). An empty queue answers deny. Prompts are recorded."""

    def __init__(self, answers: Iterable[str | None] = ()) -> None:
        self.answers: deque[str | None] = deque(answers)
        self.prompts: list[tuple[AskPrompt, str]] = []

    async def ask(self, prompt: AskPrompt, guivm: str) -> bytes:
        self.prompts.append((prompt, guivm))
        answer = self.answers.popleft() if self.answers else "deny"
        if answer is None:
            await asyncio.Event().wait()  # never set: only a timeout ends this prompt
        assert answer is not None
        return resolve_scripted_answer(answer, prompt)


def resolve_scripted_answer(answer: str, prompt: AskPrompt) -> bytes:
    """Turn a scripted answer word into wire bytes: ``allow`` picks
    :meth:`AskPrompt.yes_target` (or the first candidate); ``allow:T`` and ``deny`` pass
    through unchanged (so a script can also give an invalid answer, on purpose)."""
    if answer == "allow":
        target = prompt.yes_target() or (prompt.targets[0] if prompt.targets else "")
        return f"allow:{target}".encode("ascii", "replace")
    return answer.encode("ascii", "replace")


@dataclass(frozen=True, slots=True)
class ScriptRule:
    service: str
    argument: str
    source: str
    answer: str

    def matches(self, prompt: AskPrompt) -> bool:
        return (
            self.service in ("*", prompt.service)
            and self.argument in ("*", prompt.argument)
            and self.source in ("*", prompt.source)
        )


def parse_script(text: str, path: str) -> list[ScriptRule]:
    """Lines ``SERVICE ARGUMENT SOURCE ANSWER`` (``*`` matches anything; ARGUMENT is ``+``,
    ``+ARG`` or ``*``, as in policy files); ANSWER is ``allow``, ``allow:TARGET``, ``deny``
    or ``silent`` (never answer). ``#`` starts a comment line."""
    rules = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        words = line.split()
        if len(words) != 4:
            raise ValueError(f"{path}:{lineno}: expected SERVICE ARGUMENT SOURCE ANSWER")
        answer = words[3]
        if answer not in ("allow", "deny", "silent") and not answer.startswith("allow:"):
            raise ValueError(f"{path}:{lineno}: unknown answer {answer!r}")
        rules.append(ScriptRule(*words))
    return rules


class ScriptedPrompter:
    """Answers from a rules file (:func:`parse_script`), re-read at every prompt so a test
    or the testbed can change its answers while the daemon runs. The first matching rule
    answers; no match, a missing or a broken file answer deny (logged)."""

    def __init__(self, path: str) -> None:
        self.path = path

    async def ask(self, prompt: AskPrompt, guivm: str) -> bytes:
        try:
            with open(self.path, encoding="utf-8") as f:
                rules = parse_script(f.read(), self.path)
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            log.warning("scripted prompter: %s; answering deny", exc)
            return b"deny"
        for rule in rules:
            if rule.matches(prompt):
                if rule.answer == "silent":
                    await asyncio.Event().wait()
                return resolve_scripted_answer(rule.answer, prompt)
        log.info("scripted prompter: no rule for %s%s from %s; answering deny",
                 prompt.service, prompt.argument, prompt.source)  # fmt: skip
        return b"deny"
