"""Command-line option scanning for the per-call clients, the way C's getopt does it.

``argparse`` (and ``getopt``, through ``gettext``) cost milliseconds of imports at every
client start; Qubes' clients use ``getopt_long`` anyway. :func:`scan` does what those
programs rely on: short options clustered (``-tT``) or with their value attached (``-dvm1``,
``-w5``), long options with ``=VALUE`` or the next argument, unambiguous prefixes of long
names (``--socket`` for ``--socket-dir``), ``--`` ending the options, and either GNU
permutation (options may follow operands, as in ``qrexec-client``) or POSIX order (the first
operand ends the options, as ``qrexec-client-vm`` needs for its LOCAL_PROGRAM's arguments).

Pure: no I/O, imports only the error type.
"""

from __future__ import annotations

from qrexec.errors import UsageError


def _long_name(given: str, longs: dict[str, bool]) -> str:
    if given in longs:
        return given
    matches = [name for name in longs if name.startswith(given)]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise UsageError(f"unrecognized option '--{given}'")
    raise UsageError(f"option '--{given}' is ambiguous ({', '.join('--' + m for m in matches)})")


def scan(
    argv: list[str], shorts: str, longs: dict[str, bool], *, permute: bool
) -> tuple[list[tuple[str, str]], list[str]]:
    """Split ``argv`` into ``[(option, value)]`` and the operands.

    ``shorts`` is a getopt string (``"hd:l:"``: a colon after a letter takes a value);
    ``longs`` maps a long name to whether it takes a value. Options come back as ``-x`` or
    ``--name``; a flag's value is ``""``. UsageError names what was wrong.
    """
    options: list[tuple[str, str]] = []
    operands: list[str] = []
    index = 0
    while index < len(argv):
        arg = argv[index]
        index += 1
        if arg == "--":
            operands.extend(argv[index:])
            break
        if arg.startswith("--"):
            name, has_value, value = arg[2:].partition("=")
            name = _long_name(name, longs)
            if longs[name]:
                if not has_value:
                    if index >= len(argv):
                        raise UsageError(f"option '--{name}' requires an argument")
                    value = argv[index]
                    index += 1
            elif has_value:
                raise UsageError(f"option '--{name}' doesn't allow an argument")
            options.append((f"--{name}", value))
            continue
        if arg.startswith("-") and arg != "-":
            position = 1
            while position < len(arg):
                letter = arg[position]
                spot = shorts.find(letter)
                if spot < 0 or letter == ":":
                    raise UsageError(f"invalid option -- '{letter}'")
                if spot + 1 < len(shorts) and shorts[spot + 1] == ":":
                    value = arg[position + 1 :]
                    if not value:
                        if index >= len(argv):
                            raise UsageError(f"option requires an argument -- '{letter}'")
                        value = argv[index]
                        index += 1
                    options.append((f"-{letter}", value))
                    break
                options.append((f"-{letter}", ""))
                position += 1
            continue
        operands.append(arg)
        if not permute:
            operands.extend(argv[index:])
            break
    return options, operands
