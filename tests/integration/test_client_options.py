"""The clients' hand-rolled getopt (qrexec.client.options) and qrexec-client's options."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from qrexec.client.client_args import USAGE, ClientOptions, HelpRequested, parse_args
from qrexec.client.options import scan
from qrexec.errors import UsageError

SHORTS = "ab:c"
LONGS = {"flag": False, "value": True, "verbose": False, "version": True}


def test_scan_clusters_attached_values_long_forms_and_prefixes() -> None:
    options, rest = scan(
        ["-ac", "-bX", "-b", "Y", "--flag", "--value=1", "--value", "2", "--fl", "op"],
        SHORTS,
        LONGS,
        permute=True,
    )
    assert options == [
        ("-a", ""),
        ("-c", ""),
        ("-b", "X"),
        ("-b", "Y"),
        ("--flag", ""),
        ("--value", "1"),
        ("--value", "2"),
        ("--flag", ""),
    ]
    assert rest == ["op"]


def test_scan_permutation_and_posix_order() -> None:
    argv = ["op1", "-a", "op2", "--", "-c"]
    assert scan(argv, SHORTS, LONGS, permute=True) == ([("-a", "")], ["op1", "op2", "-c"])
    assert scan(argv, SHORTS, LONGS, permute=False) == ([], argv)
    assert scan(["-", "-a"], SHORTS, LONGS, permute=True) == ([("-a", "")], ["-"])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["-x"], "invalid option -- 'x'"),
        (["-b"], "requires an argument -- 'b'"),
        (["--nope"], "unrecognized option '--nope'"),
        (["--ver"], "ambiguous"),
        (["--flag=1"], "doesn't allow an argument"),
        (["--value"], "requires an argument"),
    ],
)
def test_scan_errors(argv: list[str], message: str) -> None:
    with pytest.raises(UsageError, match=re.escape(message)):
        scan(argv, SHORTS, LONGS, permute=True)


def test_every_qrexec_client_option_parses() -> None:
    options = parse_args(
        [
            "-dvm1", "-E", "-tT", "-w", "2.5", "-W", "-k", "--prefix-data=pre", "-v",
            "--socket-dir", "/s", "--transport", "socket", "user:cmd", "-e",
        ]
    )  # fmt: skip
    assert options == ClientOptions(
        dest="vm1",
        cmdline="user:cmd",
        just_exec=True,
        no_exit_code=True,
        filter_stdout=True,
        filter_stderr=True,
        timeout=2.5,
        wait=True,
        kill=True,
        prefix_data="pre",
        socket_dir="/s",
        transport="socket",
        verbose=True,
    )
    assert parse_args(["-d", "vm1", "-l", "cat", "u:c"]).local_cmd == "cat"
    assert parse_args(["-d", "vm1", "-c", "id,vm2,3", "u:c"]).connect == "id,vm2,3"
    assert parse_args(["-d", "vm1", "--use-stdin-socket", "u:c"]).use_stdin_socket


@pytest.mark.parametrize(
    "argv",
    [
        ["user:cmd"],
        ["-d", "vm1"],
        ["-d", "vm1", "a", "b"],
        ["-d", "vm1", "-e", "-l", "x", "u:c"],
        ["-d", "vm1", "-l", "x", "--use-stdin-socket", "u:c"],
        ["-d", "vm1", "-p", "a", "-p", "b", "u:c"],
        ["-d", "vm1", "-w", "soon", "u:c"],
        ["-d", "vm1", "-w", "-1", "u:c"],
    ],
)
def test_usage_errors(argv: list[str]) -> None:
    with pytest.raises(UsageError):
        parse_args(argv)


def test_help_lists_every_option() -> None:
    with pytest.raises(HelpRequested):
        parse_args(["-d", "vm1", "-h"])
    for option in ("-d", "-l", "-c", "-e", "-E", "--no-exit-code", "-t", "-T", "-w", "-W",
                   "-k", "-p", "--prefix-data", "--use-stdin-socket", "--socket-dir",
                   "--transport", "-v", "--verbose", "-h", "--help"):  # fmt: skip
        assert re.search(rf"(^|[ ,]){re.escape(option)}\b", USAGE, re.M), option


@pytest.mark.parametrize(
    ("argv", "code", "stream", "text"),
    [
        (["-h"], 0, "stdout", "usage: qrexec-client"),
        (["--bogus"], 2, "stderr", "usage: qrexec-client"),
        (["-d", "vm1"], 2, "stderr", "usage: qrexec-client"),
        # -c with -e: R4.3's exit 1 (spec §15.1), decided by the program, not the parser.
        (["-d", "vm1", "-c", "id,vm2,3", "-e", "u:c"], 1, "stderr", "-c cannot be combined"),
    ],
)
def test_program_exit_codes_for_help_and_usage(
    argv: list[str], code: int, stream: str, text: str
) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "qrexec.client.cli", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == code
    assert text in getattr(done, stream)
