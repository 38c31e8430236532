"""Readers for the two legacy per-service formats, producing modern rules (spec §6.3).

* R3.x-R4.0, ``/etc/qubes-rpc/policy/SERVICE[+ARG]``: ``SOURCE TARGET ACTION[,key=value…]``
  with ``$``-keywords and ``$include:PATH``. Read as upstream's ``!include-service`` and
  ``!compat-4.0`` do: ``$`` becomes ``@``, ``,`` a space, ``$include:`` an include.
* 2011 (R1), ``/etc/qubes_rpc/policy/SERVICE``: ``SRCVM DESTVM ACTION[,user=U][,target=VM]``
  with the bare keywords ``anyvm`` (any VM but dom0), ``dispvm`` and ``dom0``.

Both produce :class:`~qrexec.policy.engine.rules.Rule` objects that remember the legacy file and
line,
so evaluation, logs and the converter share one meaning. Does no I/O.
"""

from __future__ import annotations

from qrexec.errors import PolicySyntaxError
from qrexec.policy.engine.model import RuleRef
from qrexec.policy.engine.parser import INCLUDE, Directive, Statement, check_text
from qrexec.policy.engine.rules import Rule, build_rule, validate_service

LEGACY_INCLUDE_PREFIX = "$include:"


def split_legacy_name(name: str, path: str) -> tuple[str, str]:
    """``SERVICE+ARG`` file name → (service, ``+ARG``); ``SERVICE`` → (service, ``*``)."""
    service, plus, arg = name.partition("+")
    argument = plus + arg if plus else "*"
    validate_service(service, argument, path, None)
    return service, argument


def parse_r40_text(text: str, path: str, service: str, argument: str) -> list[Statement]:
    """Rules of an R4.0 per-service file; ``$include:`` lines become ``!include`` directives.

    The directives keep R4.0 meaning: the included file is R4.0 syntax for the same service
    and argument (the builder knows that from the context it follows them in).
    """
    check_text(text, path)
    statements: list[Statement] = []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith(LEGACY_INCLUDE_PREFIX):
            target = line[len(LEGACY_INCLUDE_PREFIX) :].strip()
            if not target or len(target.split()) != 1:
                raise PolicySyntaxError(path, lineno, "$include: needs exactly one path")
            statements.append(Directive(INCLUDE, (target,), path, lineno))
            continue
        fields = line.replace("$", "@").replace(",", " ").split()
        if len(fields) < 3:
            raise PolicySyntaxError(path, lineno, "expected SOURCE TARGET ACTION[,OPTIONS]")
        source, target, action, *options = fields
        ref = RuleRef(path, lineno, line)
        statements.append(build_rule(service, argument, source, target, action, options, ref))
    return statements


#: 2011 keywords and names → modern tokens, per column.
_SOURCE_2011 = {"anyvm": "@anyvm", "dom0": "@adminvm", "dispvm": "@type:DispVM"}
_TARGET_2011 = {"anyvm": "@anyvm", "dom0": "@adminvm", "dispvm": "@dispvm"}
_REDIRECT_2011 = {"dom0": "@adminvm", "dispvm": "@dispvm"}


def _token_2011(word: str, table: dict[str, str], what: str, path: str, lineno: int) -> str:
    if word in table:
        return table[word]
    if not word or word[0] in "@$*" or word == "anyvm":
        raise PolicySyntaxError(path, lineno, f"{word!r} is not a 2011 {what}")
    return word


def parse_2011_text(text: str, path: str, service: str, argument: str) -> list[Rule]:
    """Rules of a 2011 per-service file. No-match-means-deny is the caller's job."""
    check_text(text, path)
    rules: list[Rule] = []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split()
        if len(fields) != 3:
            raise PolicySyntaxError(path, lineno, "expected SRCVM DESTVM ACTION[,OPTIONS]")
        src_word, dst_word, action_word = fields
        action, *raw_options = action_word.split(",")
        source = _token_2011(src_word, _SOURCE_2011, "source", path, lineno)
        target = _token_2011(dst_word, _TARGET_2011, "destination", path, lineno)
        options: list[str] = []
        for opt in raw_options:
            key, eq, value = opt.partition("=")
            if key not in ("user", "target") or not eq:
                raise PolicySyntaxError(path, lineno, f"invalid 2011 option {opt!r}")
            if key == "target":
                value = _token_2011(value, _REDIRECT_2011, "target", path, lineno)
            options.append(f"{key}={value}")
        ref = RuleRef(path, lineno, line)
        rules.append(build_rule(service, argument, source, target, action, options, ref))
    return rules
