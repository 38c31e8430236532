"""qrexec.lazy_logging: the clients' loggers import logging only to show a record.

Each case runs in a fresh interpreter, since whether ``logging`` is imported is the point.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(60)


def run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=False
    )


def test_debug_and_info_import_nothing_and_show_nothing() -> None:
    done = run(
        "import sys\n"
        "from qrexec.lazy_logging import configure, get_logger\n"
        "configure(debug=False, format='prog: %(message)s')\n"
        "log = get_logger('x')\n"
        "log.debug('d %s', 1)\n"
        "log.info('i')\n"
        "print('logging' in sys.modules)\n"
    )
    assert (done.returncode, done.stdout, done.stderr) == (0, "False\n", "")


def test_warning_applies_the_deferred_format_and_names_the_caller() -> None:
    done = run(
        "import sys\n"
        "from qrexec.lazy_logging import configure, get_logger\n"
        "configure(debug=False, format='prog: %(message)s (%(funcName)s)')\n"
        "log = get_logger('x')\n"
        "def where():\n"
        "    log.warning('w %s', 1)\n"
        "    log.error('e')\n"
        "    log.debug('now logging is loaded, but debug stays below the level')\n"
        "where()\n"
    )
    assert (done.returncode, done.stderr) == (0, "prog: w 1 (where)\nprog: e (where)\n")


def test_debug_configuration_shows_every_level_at_once() -> None:
    done = run(
        "from qrexec.lazy_logging import configure, get_logger\n"
        "configure(debug=True, format='prog: %(levelname)s %(message)s')\n"
        "get_logger('x').debug('d')\n"
        "get_logger('x').info('i')\n"
    )
    assert done.stderr == "prog: DEBUG d\nprog: INFO i\n"


def test_forwards_once_logging_is_loaded_and_configured() -> None:
    done = run(
        "import logging\n"
        "logging.basicConfig(level=logging.DEBUG, format='app: %(name)s %(message)s')\n"
        "from qrexec.lazy_logging import get_logger\n"
        "get_logger('qrexec.backends.socket').debug('d')\n"
    )
    assert done.stderr == "app: qrexec.backends.socket d\n"


def test_sync_gives_plain_logging_code_the_deferred_format() -> None:
    done = run(
        "from qrexec.lazy_logging import configure, sync\n"
        "configure(debug=False, format='prog: %(message)s')\n"
        "import logging\n"  # as a backend or dom0-local code that uses plain logging
        "sync()\n"
        "logging.getLogger('plain').warning('w')\n"
        "logging.getLogger('plain').info('below the level')\n"
    )
    assert (done.returncode, done.stderr) == (0, "prog: w\n")
