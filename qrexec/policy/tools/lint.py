"""``qubes-policy-lint [-s] [-i] [--system-info FILE] FILE…``: check policy files without
installing them.

Each file is parsed on its own (``-`` reads standard input): modern syntax by default, the old
per-service syntax of ``!include-service`` files with ``-i``. Directives are checked but not
followed, so lint each included file too. A ``*.policy`` name that would make dom0 deny
everything is reported as well. Errors go to stderr as ``path:line: reason`` (``-s`` adds the
offending line).

Warnings, as ``path:line: warning: reason``, name tokens that load (as in Qubes' engine) but
can match no qube: names with characters or a length qube names cannot have, malformed
``uuid:`` forms, ``@dispvm:`` of dom0. With ``--system-info`` they also name qubes, uuids and
disposable templates that this system does not have. The exit status is 1 when any file has
an error, 0 otherwise (warnings alone do not fail).
"""

from __future__ import annotations

import argparse
import dataclasses
import posixpath
import sys
from collections.abc import Iterable, Iterator, Sequence

from qrexec.errors import PolicySyntaxError, SystemInfoError
from qrexec.policy.engine.parser import Statement, parse_policy_text
from qrexec.policy.engine.rules import Rule
from qrexec.policy.engine.system_info import SystemInfo, load_system_info
from qrexec.policy.engine.tokens import never_matches, unknown_qube
from qrexec.policy.loading.builder import DirEntry, considered_policy_files
from qrexec.policy.loading.legacy import parse_r40_text

PROG = "qubes-policy-lint"


@dataclasses.dataclass(frozen=True, slots=True)
class LintWarning:
    """Something that loads but is most likely not what the author meant."""

    path: str
    lineno: int
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.lineno}: warning: {self.message}"


def _parse(text: str, path: str, *, include_service: bool) -> list[Statement]:
    if include_service:
        return parse_r40_text(text, path, "lint.Service", "*")
    name = posixpath.basename(path)
    considered_policy_files(posixpath.dirname(path), [DirEntry(name, True)])
    return parse_policy_text(text, path)


def token_warnings(rules: Iterable[Rule], info: SystemInfo | None = None) -> Iterator[LintWarning]:
    """Warnings for every token of ``rules`` that matches no qube (on ``info``, if given)."""
    for rule in rules:
        places = (
            ("source", rule.source),
            ("target", rule.target),
            ("target=", rule.redirect),
            ("default_target=", rule.default_target),
        )
        for place, token in places:
            if token is None:
                continue
            why = never_matches(token)
            if why is None and info is not None:
                why = unknown_qube(token, info)
            if why is not None:
                message = f"{place} {why}; it loads but matches no qube"
                yield LintWarning(rule.ref.path, rule.ref.lineno, message)


def lint_text(
    text: str, path: str, *, include_service: bool, info: SystemInfo | None = None
) -> tuple[PolicySyntaxError | None, list[LintWarning]]:
    """The first syntax error of one file's text (or None), and the warnings if it has none."""
    try:
        statements = _parse(text, path, include_service=include_service)
    except PolicySyntaxError as exc:
        return exc, []
    rules = (s for s in statements if isinstance(s, Rule))
    return None, list(token_warnings(rules, info))


def _read(path: str) -> str:
    if path == "-":
        return sys.stdin.read()
    with open(path, encoding="utf-8") as f:
        return f.read()


def _show_line(text: str, lineno: int | None) -> None:
    if lineno is not None:
        print(f"    {text.splitlines()[lineno - 1].strip()}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("-s", "--show-line", action="store_true", help="print the bad line too")
    parser.add_argument(
        "-i",
        "--include-service",
        action="store_true",
        help="files use the old per-service syntax (as read by !include-service)",
    )
    parser.add_argument(
        "--system-info",
        metavar="FILE",
        help="system info JSON: also warn about qubes that do not exist there",
    )
    parser.add_argument("files", nargs="+", metavar="FILE", help="policy file, - for stdin")
    args = parser.parse_args(argv)
    info = None
    if args.system_info:
        try:
            info = load_system_info(args.system_info)
        except SystemInfoError as exc:
            print(f"{PROG}: {exc}", file=sys.stderr)
            return 1
    failed = False
    for path in args.files:
        name = "<stdin>" if path == "-" else path
        try:
            text = _read(path)
        except (OSError, UnicodeDecodeError) as exc:
            print(f"{name}: cannot read: {exc}", file=sys.stderr)
            failed = True
            continue
        error, warnings = lint_text(text, name, include_service=args.include_service, info=info)
        for warning in warnings:
            print(str(warning), file=sys.stderr)
            if args.show_line:
                _show_line(text, warning.lineno)
        if error is None:
            continue
        failed = True
        print(str(error), file=sys.stderr)
        if args.show_line:
            _show_line(text, error.lineno)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
