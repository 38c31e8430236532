"""``qrexec-legacy-convert``: print modern policy equivalent to legacy per-service files.

Usage::

    qrexec-legacy-convert [--from r4.0|2011] [--input-dir DIR] [-o OUT] [FILE…]

Without FILE, every per-service file of the legacy directory is converted (``--input-dir``,
else ``$QREXEC_LEGACY_POLICY_DIR`` or /etc/qubes-rpc/policy for r4.0, ``$QREXEC_2011_POLICY_DIR``
or /etc/qubes_rpc/policy for 2011). With FILEs, just those (service and argument come from
each file name; ``$include:`` paths resolve against the input directory). The result goes to
stdout or ``-o OUT`` (e.g. /etc/qubes/policy.d/35-converted.policy, replacing the
``!compat-4.0`` / ``!compat-2011`` line). Unlike upstream's converter it never edits, renames
or removes the legacy files. Exit 0 on success, 1 on a syntax or read error
(``path:line: reason`` on stderr), 2 on usage errors.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from qrexec.errors import PolicySyntaxError
from qrexec.policy.loading.fs_loader import FilesystemStore
from qrexec.policy.loading.legacy_convert import convert_dir, convert_files
from qrexec.policy.loading.paths import PolicyPaths

PROG = "qrexec-legacy-convert"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Convert R4.0 or 2011 per-service policy files to the modern format.",
    )
    parser.add_argument("--from", dest="fmt", choices=("r4.0", "2011"), default="r4.0")
    parser.add_argument("--input-dir", metavar="DIR", help="legacy policy directory")
    parser.add_argument("-o", "--output", metavar="OUT", help="write here instead of stdout")
    parser.add_argument("files", nargs="*", metavar="FILE")
    args = parser.parse_args(argv)
    paths = PolicyPaths.from_env(os.environ)
    directory = args.input_dir or (paths.legacy_dir if args.fmt == "r4.0" else paths.dir_2011)
    store = FilesystemStore()
    try:
        if args.files:
            text = convert_files(store, args.fmt, args.files, directory)
        elif not os.path.isdir(directory):
            print(f"{PROG}: {directory}: not a directory", file=sys.stderr)
            return 1
        else:
            text = convert_dir(store, args.fmt, directory)
    except PolicySyntaxError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
