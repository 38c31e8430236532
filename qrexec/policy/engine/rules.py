"""One policy rule: its fields, their validation, and its text form.

A rule is ``SERVICE ARGUMENT SOURCE TARGET ACTION [key=value …]`` (spec §6.2). Every reader
(modern, R4.0 and 2011 formats) ends up building :class:`Rule` objects through
:func:`build_rule`, so the validation of tokens, actions and options lives here once. Does no
I/O.
"""

from __future__ import annotations

import dataclasses
import re

from qrexec.errors import PolicySyntaxError
from qrexec.policy.engine.model import Action, RuleRef
from qrexec.policy.engine.tokens import Column, Token, TokenKind, parse_token

_SERVICE = re.compile(r"^[A-Za-z0-9._-]+$")
_ARGUMENT = re.compile(r"^\+[A-Za-z0-9+._-]*$")
_USER = re.compile(r"^[A-Za-z0-9_.-]+$")

#: Options each action accepts (§6.2 "Actions").
OPTIONS: dict[Action, frozenset[str]] = {
    Action.DENY: frozenset({"notify"}),
    Action.ALLOW: frozenset({"target", "user", "autostart", "notify"}),
    Action.ASK: frozenset({"target", "default_target", "user", "autostart", "notify"}),
}


@dataclasses.dataclass(frozen=True, slots=True)
class Rule:
    """A parsed rule. ``service``/``argument`` None mean ``*``; ``argument`` keeps its ``+``.

    ``redirect`` is the ``target=`` option. ``options`` keeps the options as written (for the
    text form); the typed fields are what evaluation uses.
    """

    service: str | None
    argument: str | None
    source: Token
    target: Token
    action: Action
    redirect: Token | None
    default_target: Token | None
    user: str | None
    autostart: bool
    notify: bool
    options: tuple[tuple[str, str], ...]
    ref: RuleRef

    def to_text(self) -> str:
        """The rule as one line of the modern format (what converters and graphs print)."""
        fields = [
            self.service or "*",
            self.argument or "*",
            self.source.text,
            self.target.text,
            self.action.value,
        ]
        fields.extend(f"{key}={value}" for key, value in self.options)
        return " ".join(fields)

    def matches_service(self, service: str, argument: str) -> bool:
        return (self.service is None or self.service == service) and (
            self.argument is None or self.argument == argument
        )


def _bool(value: str, key: str, path: str, lineno: int) -> bool:
    if value == "yes":
        return True
    if value == "no":
        return False
    raise PolicySyntaxError(path, lineno, f"{key}= must be yes or no, not {value!r}")


def validate_service(service: str, argument: str, path: str, lineno: int | None) -> None:
    """Check the SERVICE and ARGUMENT columns (``*`` service needs ``*`` argument)."""
    if service != "*" and not _SERVICE.match(service):
        raise PolicySyntaxError(path, lineno, f"invalid service name {service!r}")
    if argument != "*" and not _ARGUMENT.match(argument):
        if not argument.startswith("+"):
            raise PolicySyntaxError(path, lineno, f"argument {argument!r} must start with +")
        raise PolicySyntaxError(path, lineno, f"invalid argument {argument!r}")
    if service == "*" and argument != "*":
        raise PolicySyntaxError(path, lineno, "a * service requires a * argument")


def build_rule(
    service: str,
    argument: str,
    source: str,
    target: str,
    action: str,
    options: list[str],
    ref: RuleRef,
) -> Rule:
    """Validate the fields of one rule line and build the Rule (raises PolicySyntaxError)."""
    path, lineno = ref.path, ref.lineno
    validate_service(service, argument, path, lineno)
    src = parse_token(source, Column.SOURCE, path, lineno)
    tgt = parse_token(target, Column.TARGET, path, lineno)
    try:
        act = Action(action)
    except ValueError:
        raise PolicySyntaxError(path, lineno, f"invalid action {action!r}") from None

    seen: dict[str, str] = {}
    pairs: list[tuple[str, str]] = []
    for opt in options:
        key, eq, value = opt.partition("=")
        if not eq or not key:
            raise PolicySyntaxError(path, lineno, f"invalid option {opt!r} (expected key=value)")
        if key not in OPTIONS[act]:
            raise PolicySyntaxError(path, lineno, f"invalid option {key!r} for {act.value}")
        if key in seen:
            raise PolicySyntaxError(path, lineno, f"repeated option {key!r}")
        seen[key] = value
        pairs.append((key, value))

    redirect = default_target = None
    if "target" in seen:
        redirect = parse_token(seen["target"], Column.REDIRECT, path, lineno)
    if "default_target" in seen:
        default_target = parse_token(seen["default_target"], Column.REDIRECT, path, lineno)
    user = seen.get("user")
    if user is not None and not _USER.match(user):
        raise PolicySyntaxError(path, lineno, f"invalid user {user!r}")
    autostart = _bool(seen["autostart"], "autostart", path, lineno) if "autostart" in seen else True
    default_notify = act is Action.DENY
    notify = _bool(seen["notify"], "notify", path, lineno) if "notify" in seen else default_notify
    if act is Action.ALLOW and tgt.kind is TokenKind.DEFAULT and redirect is None:
        raise PolicySyntaxError(path, lineno, "allow for @default target requires target=")
    return Rule(
        service=None if service == "*" else service,
        argument=None if argument == "*" else argument,
        source=src,
        target=tgt,
        action=act,
        redirect=redirect,
        default_target=default_target,
        user=user,
        autostart=autostart,
        notify=notify,
        options=tuple(pairs),
        ref=ref,
    )
