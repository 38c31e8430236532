"""Turn legacy policy (R4.0 or 2011 per-service files) into modern policy text.

The output reproduces exactly the rules ``!compat-4.0`` / ``!compat-2011`` would read (including
the implicit denies after ``SERVICE+ARG`` files), so a converted file can replace the directive
in /etc/qubes/policy.d without changing any decision. Each rule is preceded by a comment naming
the legacy file, line and text it came from. Does no I/O: files are read through a
:class:`~qrexec.policy.loading.builder.PolicyStore`.
"""

from __future__ import annotations

from collections.abc import Iterable

from qrexec.policy.engine.rules import Rule
from qrexec.policy.loading.builder import PolicyStore, read_legacy_dir, read_legacy_file

FORMAT_TITLES = {"r4.0": "R4.0", "2011": "2011"}


def rules_to_text(rules: Iterable[Rule], header: str) -> str:
    """Modern policy text for ``rules``: a header comment, then each rule with its origin."""
    lines = [f"# {line}".rstrip() for line in header.splitlines()]
    for rule in rules:
        lines.append("")
        if rule.ref.lineno == 0:  # the implicit denies after a SERVICE+ARG file
            lines.append(f"# implicit deny closing {rule.ref.path} (nothing else matched there)")
        else:
            lines.append(f"# {rule.ref.path}:{rule.ref.lineno}: {rule.ref.text}")
        lines.append(rule.to_text())
    return "\n".join(lines) + "\n"


def _header(fmt: str, what: str) -> str:
    return (
        f"Converted by qrexec-legacy-convert from the {FORMAT_TITLES[fmt]} policy {what}.\n"
        f"Same decisions as reading it through !compat-{'4.0' if fmt == 'r4.0' else '2011'}."
    )


def convert_dir(store: PolicyStore, fmt: str, directory: str) -> str:
    """Modern text equivalent to a whole legacy directory (raises PolicySyntaxError)."""
    return rules_to_text(read_legacy_dir(store, fmt, directory), _header(fmt, f"in {directory}"))


def convert_files(store: PolicyStore, fmt: str, paths: Iterable[str], include_dir: str) -> str:
    """Modern text for the given legacy files, in the order given (raises PolicySyntaxError)."""
    paths = list(paths)
    rules: list[Rule] = []
    for path in paths:
        rules.extend(read_legacy_file(store, fmt, path, include_dir))
    return rules_to_text(rules, _header(fmt, "from " + ", ".join(paths)))
