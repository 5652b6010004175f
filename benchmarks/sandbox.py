"""Programs per second through the HumanEval sandbox (`raylm.eval.sandbox`), one at a time and on a pool.

The programs are HumanEval's canonical solutions with their tests (the first --programs of
../shared/data/benchmarks/humaneval/HumanEval.jsonl.gz, or RAYLM_SHARED_DATA), or, where that file
is absent, a small stand-in program. Reported: milliseconds per program run one after another,
programs per second through `check_programs` with --workers, and whether every one passed. Goal
(issue 28): the OS fence costs at most 1.5x the time per program of the sandbox it replaced;
`--raylm-from DIR` measures another checkout's sandbox (e.g. main's) the same way.

    python benchmarks/sandbox.py [--programs 40] [--workers 2] [--repeats 3] [--raylm-from DIR]
"""

from __future__ import annotations

import os
import sys

from _repo import ROOT  # puts the repository root on sys.path

REPO = str(ROOT)

import argparse  # noqa: E402
import gzip  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

SHARED = Path(os.environ.get("RAYLM_SHARED_DATA", Path(REPO).parent / "shared" / "data"))
STAND_IN = "def add(a, b):\n    return a + b\n\n\nassert add(2, 3) == 5\nassert sorted([3, 1, 2]) == [1, 2, 3]\n"


def load_programs(count: int) -> tuple[list[str], str]:
    path = SHARED / "benchmarks" / "humaneval" / "HumanEval.jsonl.gz"
    if not path.exists():
        return [STAND_IN] * count, f"stand-in program ({path} is absent)"
    with gzip.open(path, "rt") as handle:
        problems = [json.loads(line) for line in handle if line.strip()][:count]
    programs = [f"{p['prompt']}{p['canonical_solution']}\n\n{p['test']}\ncheck({p['entry_point']})\n" for p in problems]
    return programs, f"HumanEval canonical solutions ({len(programs)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--programs", type=int, default=40, help="programs per measurement")
    parser.add_argument("--workers", type=int, default=2, help="concurrent programs in the pooled measurement")
    parser.add_argument("--repeats", type=int, default=3, help="measurements of each kind; the best is kept")
    parser.add_argument("--raylm-from", metavar="DIR", help="import raylm from this checkout instead of this one")
    args = parser.parse_args()
    if args.raylm_from:
        sys.path.insert(0, os.path.abspath(args.raylm_from))

    from raylm.eval.sandbox import SandboxLimits, allow_code_execution, check_programs, run_program

    programs, what = load_programs(args.programs)
    limits = SandboxLimits(timeout_s=10.0, memory_mb=1024, workers=args.workers)
    allow_code_execution(True, limits)
    first = run_program(programs[0], limits)  # the isolation probe and warm caches, not measured
    sequential, pooled, all_passed = [], [], first.passed
    for _ in range(args.repeats):
        started = time.perf_counter()
        results = [run_program(source, limits) for source in programs]
        sequential.append((time.perf_counter() - started) / len(programs))
        all_passed &= all(r.passed for r in results)
        started = time.perf_counter()
        results = check_programs(programs, limits)
        pooled.append(len(programs) / (time.perf_counter() - started))
        all_passed &= all(r.passed for r in results)
    ms_per_program, per_s_pool = min(sequential) * 1000, max(pooled)
    import raylm.eval.sandbox as sandbox_module

    print(f"programs: {what}; sandbox from {os.path.dirname(os.path.dirname(sandbox_module.__file__))}")
    print(f"isolation: {first.isolation}")
    print(f"{'measurement':36}{'value':>12}")
    print(f"{'ms per program, one at a time':36}{ms_per_program:>12.1f}")
    print(f"{'programs/s, one at a time':36}{1000 / ms_per_program:>12.1f}")
    print(f"{f'programs/s, {args.workers} workers':36}{per_s_pool:>12.1f}")
    print(f"{'all passed':36}{str(all_passed):>12}")
    print(f"sandbox: isolation={first.isolation.split()[0]} programs={len(programs)} workers={args.workers} "
          f"ms_per_program={ms_per_program:.1f} programs_per_s={1000 / ms_per_program:.1f} "
          f"programs_per_s_pool={per_s_pool:.1f} all_passed={all_passed}")


if __name__ == "__main__":
    main()
