"""Parse the text of one modern policy file into rules and directives (spec §6.2).

Directives are returned unresolved: following ``!include`` and friends needs file access,
which :mod:`qrexec.policy.loading.builder` does through a store. Besides upstream's directives this
parser knows ``!compat-2011``, our own: it reads the original 2011 per-service files
(``/etc/qubes_rpc/policy/SERVICE``) the way ``!compat-4.0`` reads the R4.0 ones. Does no I/O.
"""

from __future__ import annotations

import dataclasses

from qrexec.errors import PolicySyntaxError
from qrexec.policy.engine.model import RuleRef
from qrexec.policy.engine.rules import Rule, build_rule, validate_service

INCLUDE = "!include"
INCLUDE_DIR = "!include-dir"
INCLUDE_SERVICE = "!include-service"
COMPAT_40 = "!compat-4.0"
COMPAT_2011 = "!compat-2011"

#: Number of arguments each directive takes.
DIRECTIVES: dict[str, int] = {
    INCLUDE: 1,
    INCLUDE_DIR: 1,
    INCLUDE_SERVICE: 3,
    COMPAT_40: 0,
    COMPAT_2011: 0,
}


@dataclasses.dataclass(frozen=True, slots=True)
class Directive:
    """A ``!directive`` line, validated but not yet followed."""

    name: str
    args: tuple[str, ...]
    path: str
    lineno: int


Statement = Rule | Directive


def check_text(text: str, path: str) -> None:
    if "\0" in text:
        raise PolicySyntaxError(path, None, "file contains a NUL byte")


def parse_directive(fields: list[str], path: str, lineno: int) -> Directive:
    """Validate a directive line already split into fields."""
    name, args = fields[0], fields[1:]
    if name not in DIRECTIVES:
        raise PolicySyntaxError(path, lineno, f"unknown directive {name!r}")
    if len(args) != DIRECTIVES[name]:
        raise PolicySyntaxError(
            path, lineno, f"{name} takes {DIRECTIVES[name]} argument(s), got {len(args)}"
        )
    if name == INCLUDE_SERVICE:
        validate_service(args[0], args[1], path, lineno)
    return Directive(name, tuple(args), path, lineno)


def parse_policy_text(text: str, path: str) -> list[Statement]:
    """Rules and directives of one modern-format file, in order; raises PolicySyntaxError."""
    check_text(text, path)
    statements: list[Statement] = []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split()
        if fields[0].startswith("!"):
            statements.append(parse_directive(fields, path, lineno))
            continue
        if len(fields) < 5:
            raise PolicySyntaxError(
                path, lineno, "expected SERVICE ARGUMENT SOURCE TARGET ACTION [OPTIONS]"
            )
        service, argument, source, target, action, *options = fields
        ref = RuleRef(path, lineno, line)
        statements.append(build_rule(service, argument, source, target, action, options, ref))
    return statements
