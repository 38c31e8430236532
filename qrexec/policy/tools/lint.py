"""``qubes-policy-lint [-s] [-i] FILE…``: check policy files without installing them.

Each file is parsed on its own (``-`` reads standard input): modern syntax by default, the old
per-service syntax of ``!include-service`` files with ``-i``. Directives are checked but not
followed, so lint each included file too. A ``*.policy`` name that would make dom0 deny
everything is reported as well. Errors go to stderr as ``path:line: reason`` (``-s`` adds the
offending line); the exit status is 1 when any file has an error, 0 otherwise.
"""

from __future__ import annotations

import argparse
import posixpath
import sys
from collections.abc import Sequence

from qrexec.errors import PolicySyntaxError
from qrexec.policy.engine.parser import parse_policy_text
from qrexec.policy.loading.builder import DirEntry, considered_policy_files
from qrexec.policy.loading.legacy import parse_r40_text

PROG = "qubes-policy-lint"


def lint_text(text: str, path: str, *, include_service: bool) -> PolicySyntaxError | None:
    """The first syntax error of one file's text, or None."""
    try:
        if include_service:
            parse_r40_text(text, path, "lint.Service", "*")
        else:
            name = posixpath.basename(path)
            considered_policy_files(posixpath.dirname(path), [DirEntry(name, True)])
            parse_policy_text(text, path)
    except PolicySyntaxError as exc:
        return exc
    return None


def _read(path: str) -> str:
    if path == "-":
        return sys.stdin.read()
    with open(path, encoding="utf-8") as f:
        return f.read()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("-s", "--show-line", action="store_true", help="print the bad line too")
    parser.add_argument(
        "-i",
        "--include-service",
        action="store_true",
        help="files use the old per-service syntax (as read by !include-service)",
    )
    parser.add_argument("files", nargs="+", metavar="FILE", help="policy file, - for stdin")
    args = parser.parse_args(argv)
    failed = False
    for path in args.files:
        name = "<stdin>" if path == "-" else path
        try:
            text = _read(path)
        except (OSError, UnicodeDecodeError) as exc:
            print(f"{name}: cannot read: {exc}", file=sys.stderr)
            failed = True
            continue
        error = lint_text(text, name, include_service=args.include_service)
        if error is None:
            continue
        failed = True
        print(str(error), file=sys.stderr)
        if args.show_line and error.lineno is not None:
            print(f"    {text.splitlines()[error.lineno - 1].strip()}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
