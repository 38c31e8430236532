"""Every fuzz corpus file, crash regressions included, replayed through its target.

The targets are the ones ``.ci/run`` fuzzes with atheris (:mod:`tests.fuzz.run`); here
they run plainly, so a regression shows up in the fast suite without atheris.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fuzz.targets import TARGETS

CORPUS = Path(__file__).resolve().parent / "corpus"
CASES = sorted((target, path) for target in TARGETS for path in (CORPUS / target).iterdir())


def test_every_target_has_a_corpus() -> None:
    for target in TARGETS:
        assert any((CORPUS / target).iterdir()), target


@pytest.mark.parametrize(("target", "path"), CASES, ids=[f"{t}/{p.name}" for t, p in CASES])
def test_corpus_input(target: str, path: Path) -> None:
    TARGETS[target](path.read_bytes())
