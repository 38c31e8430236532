"""Policy decision time: does a big policy slow down requests its rules do not concern?

Policy A is 10 wildcard rules (``*`` service and argument, ``@anyvm``/``@tag:`` sources).
Policy B is 9,990 specific rules spread over 200 services, followed by the same 10 rules.
The request names a service no specific rule mentions and matches none of the wildcard rules
(so it is denied after scanning everything that can apply). Printed: the in-process decision
time of each, their ratio B/A (the target is <= 3, thanks to the per-service index), and the
time to reload B from files (parse + build), all measured in this run.

Run: ``python bench/bench_policy.py [--repeat N]``. Exit status 1 if B/A > 3.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from qrexec.policy.engine.model import Action, Request
from qrexec.policy.engine.policy import Policy
from qrexec.policy.engine.system_info import SystemInfo, parse_system_info
from qrexec.policy.loading.fs_loader import load_policy
from qrexec.policy.loading.memory_store import policy_from_text
from qrexec.policy.loading.paths import PolicyPaths

SERVICES = 200
SPECIFIC_RULES = 9_990
MAX_RATIO = 3.0


def wildcard_rules() -> list[str]:
    """Ten rules that every request has to be checked against, none matching ours."""
    rules = []
    for i in range(10):
        source = "@anyvm" if i % 2 == 0 else f"@tag:team{i}"
        target = f"@tag:nobody{i}" if i % 3 else f"vm-other{i}"
        action = ("allow", "deny", "ask")[i % 3]
        rules.append(f"* * {source} {target} {action}")
    return rules


def specific_rules() -> list[str]:
    rules = []
    for n in range(SPECIFIC_RULES):
        service = f"bench.Service{n % SERVICES}"
        argument = "*" if n % 4 == 0 else f"+arg{n % 17}"
        source = ("@anyvm", f"vm-{n % 50}", f"@tag:tag{n % 7}")[n % 3]
        rules.append(f"{service} {argument} {source} vm-{(n * 7) % 50} allow")
    return rules


def system() -> SystemInfo:
    domains: dict[str, object] = {
        f"vm-{i}": {"type": "AppVM", "tags": [f"tag{i % 7}"]} for i in range(50)
    }
    domains["vm-src"] = {"type": "AppVM", "tags": ["team1"]}
    domains["vm-dst"] = {"type": "AppVM", "tags": []}
    return parse_system_info({"domains": domains})


def per_call(policy: Policy, request: Request, info: SystemInfo, calls: int, repeat: int) -> float:
    """Best (least disturbed) mean time of one decision, in seconds."""
    evaluate = policy.evaluate
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(calls):
            evaluate(request, info)
        best = min(best, (time.perf_counter() - start) / calls)
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=7, help="timing rounds (best is kept)")
    parser.add_argument("--calls", type=int, default=5000, help="decisions per round")
    args = parser.parse_args()

    info = system()
    request = Request("bench.Unmentioned", "+x", "vm-src", "vm-dst")
    text_a = "\n".join(wildcard_rules()) + "\n"
    text_b = "\n".join(specific_rules() + wildcard_rules()) + "\n"
    policy_a, policy_b = policy_from_text(text_a), policy_from_text(text_b)
    assert len(policy_a.rules) == 10 and len(policy_b.rules) == 10_000
    for policy in (policy_a, policy_b):
        res = policy.evaluate(request, info)
        assert res.action is Action.DENY and res.rule is None, res

    # Interleave A and B rounds so machine noise hits both alike.
    a = b = float("inf")
    for _ in range(args.repeat):
        a = min(a, per_call(policy_a, request, info, args.calls, 1))
        b = min(b, per_call(policy_b, request, info, args.calls, 1))
    ratio = b / a

    with tempfile.TemporaryDirectory() as tmp:
        policy_dir = Path(tmp) / "policy.d"
        policy_dir.mkdir()
        lines = text_b.splitlines()
        for i in range(10):  # ten files of 1,000 rules, the wildcard rules in the last one
            chunk = lines[i * 1000 : (i + 1) * 1000]
            (policy_dir / f"{i:02d}-bench.policy").write_text("\n".join(chunk) + "\n")
        paths = PolicyPaths(policy_dirs=(str(policy_dir),))
        reload_times = []
        for _ in range(3):
            start = time.perf_counter()
            reloaded = load_policy(paths)
            reload_times.append(time.perf_counter() - start)
        assert reloaded.error is None and len(reloaded.rules) == 10_000

    print(f"A (10 wildcard rules):                    {a * 1e6:8.2f} us/decision")
    print(f"B (9,990 specific over 200 services + 10): {b * 1e6:8.2f} us/decision")
    print(f"B/A ratio: {ratio:.2f} (must be <= {MAX_RATIO:.0f})")
    print(
        f"reload of B from 10 files (parse + build): {min(reload_times) * 1e3:.1f} ms (best of 3)"
    )
    return 0 if ratio <= MAX_RATIO else 1


if __name__ == "__main__":
    sys.exit(main())
