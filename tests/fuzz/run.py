"""Run the fuzz targets of :mod:`tests.fuzz.targets` with atheris (libFuzzer), coverage-guided.

    python -m tests.fuzz.run [--seconds 30] [--jobs 2] [--seed 1] [TARGET...]

Each target runs in its own process for a fixed time, starting from its corpus in
``tests/fuzz/corpus/TARGET`` (read only: new inputs go to a scratch folder) with a fixed
seed. Prints one table row per target: runs, crashes, corpus size, max RSS; exits 1 when
any target crashed (the crashing input is copied to ``tests/fuzz/crashes/``, to become a
corpus entry, i.e. a regression test, once fixed). ``--one TARGET`` is the child side.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "corpus"
CRASHES = HERE / "crashes"
REPO = HERE.parent.parent


@dataclass
class Result:
    target: str
    runs: int
    crashes: int
    corpus: int
    max_rss_mb: int
    seconds: float
    exit_code: int


def run_one_child(target: str, seconds: int, seed: int, scratch: str, artifacts: str) -> None:
    """The child: instrument our modules, then hand the target to libFuzzer."""
    import atheris

    with atheris.instrument_imports(include=["qrexec"]):
        from tests.fuzz.targets import TARGETS

    argv = [
        sys.argv[0],
        scratch,
        str(CORPUS / target),
        f"-max_total_time={seconds}",
        f"-seed={seed}",
        "-timeout=10",
        "-rss_limit_mb=1024",
        "-max_len=8192",
        f"-artifact_prefix={artifacts}/",
        "-print_final_stats=1",
    ]
    atheris.Setup(argv, TARGETS[target])
    atheris.Fuzz()


def run_target(target: str, seconds: int, seed: int) -> Result:
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=f"fuzz-{target}-") as work:
        scratch = os.path.join(work, "new")
        artifacts = os.path.join(work, "artifacts")
        os.mkdir(scratch)
        os.mkdir(artifacts)
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "tests.fuzz.run",
                "--one",
                target,
                "--seconds",
                str(seconds),
                "--seed",
                str(seed),
                "--scratch",
                scratch,
                "--artifacts",
                artifacts,
            ],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            timeout=seconds + 120,
        )
        log = proc.stdout
        runs = _last_int(r"stat::number_of_executed_units:\s*(\d+)", log)
        if runs == 0:
            runs = _last_int(r"Done (\d+) runs", log)
        rss = _last_int(r"stat::peak_rss_mb:\s*(\d+)", log)
        crashed = sorted(os.listdir(artifacts))
        if crashed:
            CRASHES.mkdir(exist_ok=True)
            for name in crashed:
                shutil.copy(os.path.join(artifacts, name), CRASHES / f"{target}-{name}")
        if proc.returncode != 0:
            tail = "\n".join(log.splitlines()[-60:])
            print(f"--- {target} exited {proc.returncode}; end of its log:\n{tail}", flush=True)
        corpus = len(os.listdir(CORPUS / target)) + len(os.listdir(scratch))
    return Result(
        target,
        runs,
        len(crashed) or (1 if proc.returncode != 0 else 0),
        corpus,
        rss,
        time.monotonic() - started,
        proc.returncode,
    )


def _last_int(pattern: str, text: str) -> int:
    found = re.findall(pattern, text)
    return int(found[-1]) if found else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("targets", nargs="*", help="targets to run (default: all)")
    parser.add_argument("--seconds", type=int, default=30, help="budget per target")
    parser.add_argument("--jobs", type=int, default=2, help="targets run at once")
    parser.add_argument("--seed", type=int, default=1, help="libFuzzer seed (fixed)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--scratch", help=argparse.SUPPRESS)
    parser.add_argument("--artifacts", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        run_one_child(args.one, args.seconds, args.seed, args.scratch, args.artifacts)
        return 0
    from tests.fuzz.targets import TARGETS

    names = args.targets or list(TARGETS)
    unknown = [n for n in names if n not in TARGETS]
    if unknown:
        parser.error(f"unknown target(s): {', '.join(unknown)}; have {', '.join(TARGETS)}")
    with ThreadPoolExecutor(max_workers=max(args.jobs, 1)) as pool:
        results = list(pool.map(lambda n: run_target(n, args.seconds, args.seed), names))
    print(f"{'target':<14} {'runs':>9} {'crashes':>7} {'corpus':>6} {'max RSS MB':>10} {'s':>5}")
    for r in results:
        print(
            f"{r.target:<14} {r.runs:>9} {r.crashes:>7} {r.corpus:>6} {r.max_rss_mb:>10} "
            f"{r.seconds:>5.0f}"
        )
    failed = [r.target for r in results if r.crashes or r.runs == 0]
    if failed:
        print(f"fuzzing failed: {', '.join(failed)} (crash inputs in {CRASHES})")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
