"""qrexec.protocol (and qrexec.errors) must import nothing that does I/O.

Checked in a fresh interpreter (``python -I -S``, so no site hooks preload anything): the
modules that appear in ``sys.modules`` only because we imported the protocol package must
not include any module on the deny list.
"""

from __future__ import annotations

import json
import os
import pkgutil
import subprocess
import sys

import pytest

import qrexec
import qrexec.protocol

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(qrexec.__file__)))

#: Modules that do I/O or imply it (networking, processes, threads, event loops, files).
FORBIDDEN = frozenset(
    {
        "asyncio",
        "socket",
        "_socket",
        "selectors",
        "select",
        "subprocess",
        "_posixsubprocess",
        "multiprocessing",
        "threading",
        "_thread",
        "concurrent",
        "ssl",
        "shutil",
        "tempfile",
        "io",
        "logging",
        "signal",
        "mmap",
        "fcntl",
        "pathlib",
        "glob",
        "http",
        "urllib",
        "ctypes",
        "cffi",
    }
)

#: Runs in the fresh interpreter: only modules that importing our package adds count
#: (a bare interpreter already has io, os... loaded; those are the baseline).
PROBE = """
import json, sys
sys.path.insert(0, {root!r})
before = set(sys.modules)
import importlib
for name in {modules!r}:
    importlib.import_module(name)
after = set(sys.modules)
print(json.dumps(sorted(after - before)))
"""


def protocol_modules() -> list[str]:
    names = ["qrexec.errors", "qrexec.protocol"]
    for info in pkgutil.iter_modules(qrexec.protocol.__path__, "qrexec.protocol."):
        names.append(info.name)
    return names


def test_every_protocol_module_is_listed() -> None:
    names = protocol_modules()
    for expected in ("constants", "messages", "framing", "negotiation", "fields", "cmdline"):
        assert f"qrexec.protocol.{expected}" in names


@pytest.mark.timeout(60)
def test_protocol_imports_no_io_modules() -> None:
    code = PROBE.format(root=ROOT, modules=protocol_modules())
    result = subprocess.run(
        [sys.executable, "-I", "-S", "-c", code], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    loaded = set(json.loads(result.stdout))
    assert "qrexec.protocol.framing" in loaded  # the probe really imported the package
    roots = {name.split(".", 1)[0] for name in loaded}
    offending = sorted(roots & FORBIDDEN)
    assert not offending, f"qrexec.protocol pulls in I/O modules: {offending}"


@pytest.mark.timeout(60)
def test_probe_detects_an_io_import() -> None:
    """The probe itself must notice a forbidden module (guards against a vacuous test)."""
    code = PROBE.format(root=ROOT, modules=["qrexec.protocol.framing", "socket"])
    result = subprocess.run(
        [sys.executable, "-I", "-S", "-c", code], capture_output=True, text=True, check=False
    )
    roots = {name.split(".", 1)[0] for name in json.loads(result.stdout)}
    assert "socket" in roots & FORBIDDEN
