"""Every script a user runs by path (`benchmarks/*.py`, `jobs/*.py`, `benchmarks/gpu_check.sh`) starts and works.

Running a file puts its folder first on `sys.path`, so a file named like a standard-library module
(`benchmarks/tokenize.py` once) replaces that module for every later import and the script dies before its
first line; these tests would have caught it. The small-size runs are what `make bench` runs at full size:
each benchmark goes end to end and ends with its one `name: key=value ...` line.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, SHARED_DATA

SCRIPT_FOLDERS = ("benchmarks", "jobs", "tests")
BENCHMARKS = sorted(p for p in (REPO / "benchmarks").glob("*.py") if not p.name.startswith("_"))
JOBS = sorted((REPO / "jobs").glob("*.py"))

# Each benchmark's figures-line prefix and small sizes (its defaults are the full sizes `make bench` runs).
SMALL_RUNS = {
    "dedup.py": ("dedup", ["--docs", "60", "--no-gutenberg", "--repeats", "1", "--largest-scale", "1"]),
    "eval.py": ("eval", ["--limit", "4", "--d-model", "32", "--layers", "1", "--seq-len", "64", "--batch-size", "4"]),
    "finetune.py": ("finetune", ["--d-model", "32", "--layers", "1", "--heads", "2", "--seq-len", "64", "--batch", "2",
                                 "--steps", "3", "--warmup", "1"]),
    "finetune_layouts.py": ("finetune_layouts", ["--layouts", "alpaca", "--conversations", "24", "--steps", "2",
                                                 "--d-model", "32", "--layers", "1"]),
    "pii.py": ("pii", ["--docs", "60", "--repeats", "1"]),
    "overhead.py": ("overhead", ["--small"]),
    "model.py": ("model", ["--batch", "2", "--seq", "32", "--rounds", "1", "--steps", "1", "--gen-batch", "1",
                           "--gen-prompt", "4", "--gen-tokens", "4"]),
    "recipe.py": ("recipe", ["--small"]),
    "sandbox.py": ("sandbox", ["--programs", "4", "--workers", "2", "--repeats", "1"]),
    "storage.py": ("storage", ["--repeats", "1", "--sizes", "tiny", "--train-steps", "6", "--checkpoint-every", "3"]),
    "tokenization.py": ("tokenize", ["--mb", "0.5", "--vocab", "512", "--files", "2", "--repeats", "1"]),
    "train.py": ("train", ["--steps", "10", "--report-every", "5", "--d-model", "32", "--seq-len", "32", "--batch", "4",
                           "--micro", "2"]),
    "tune.py": ("tune", ["--samples", "1", "--steps", "6"]),
}
NEEDS_SHARED_DATA = {"eval.py": "benchmarks", "recipe.py": "corpora/wikitext-2"}  # script -> folder it reads
FIGURES_LINE = re.compile(r"^[a-z_]+: ([a-z0-9_]+=\S+ ?)+$")


def script_env() -> dict[str, str]:
    """The environment a user has: no PYTHONPATH pointing at the checkout (the scripts find it themselves)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def run_script(args: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, env=script_env(), capture_output=True, text=True,
                          timeout=timeout)


def test_no_script_shares_a_standard_library_module_name():
    clashes = [f"{folder}/{path.name}" for folder in SCRIPT_FOLDERS for path in (REPO / folder).glob("*.py")
               if path.stem in sys.stdlib_module_names]
    assert not clashes, f"these files shadow standard-library modules when run from their folder: {clashes}"


def test_small_runs_name_every_benchmark():
    assert {p.name for p in BENCHMARKS} - {"gpu_check.py"} == set(SMALL_RUNS)


def test_every_benchmark_and_job_answers_help(tmp_path):
    """Run from another folder than the checkout: each script finds the checkout itself (the script's own
    folder, not the working directory, is what Python puts first on sys.path, so this is the shadowing
    case too)."""
    from concurrent.futures import ThreadPoolExecutor

    cwd = tmp_path
    scripts = [*BENCHMARKS, *JOBS]
    with ThreadPoolExecutor(max_workers=4) as pool:  # each mostly imports torch and Ray: run a few at once
        answers = list(pool.map(lambda script: run_script([str(script), "--help"], cwd, timeout=180), scripts))
    failures = [f"{script.relative_to(REPO)} (exit {done.returncode}): {done.stderr.strip()[-400:]}"
                for script, done in zip(scripts, answers) if done.returncode != 0 or "usage:" not in done.stdout]
    assert not failures, "\n".join(failures)


GPU_SMOKE = "gpu_check.sh --smoke"
LONGEST_FIRST = ["tune.py", "finetune_layouts.py", "train.py", "storage.py", "overhead.py", "dedup.py", GPU_SMOKE]


@pytest.fixture(scope="module")
def small_runs(tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    """Every benchmark's small run, and the GPU check's smoke mode, three at a time: each is its own process
    with its own Ray, and much of a small run is waiting (Ray's start, a worker group's start, a
    controller's polls) that another run can use."""
    from concurrent.futures import ThreadPoolExecutor

    def run(name: str) -> subprocess.CompletedProcess:
        folder = tmp_path_factory.mktemp(name.split()[0].replace(".", "_"))
        if name == GPU_SMOKE:
            return subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--smoke", "--steps", "10"],
                                  cwd=folder, env={**script_env(), "PYTHON": sys.executable}, capture_output=True,
                                  text=True, timeout=900)
        return run_script([str(REPO / "benchmarks" / name), *SMALL_RUNS[name][1]], folder, timeout=900)

    names = [n for n in SMALL_RUNS if n not in NEEDS_SHARED_DATA or (SHARED_DATA / NEEDS_SHARED_DATA[n]).exists()]
    names = sorted([*names, GPU_SMOKE], key=lambda n: LONGEST_FIRST.index(n) if n in LONGEST_FIRST else len(LONGEST_FIRST))
    with ThreadPoolExecutor(max_workers=3) as pool:
        return dict(zip(names, pool.map(run, names)))


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SMALL_RUNS))
def test_benchmark_runs_end_to_end_at_small_size(name, small_runs):
    if name in NEEDS_SHARED_DATA and not (SHARED_DATA / NEEDS_SHARED_DATA[name]).exists():
        pytest.skip(f"benchmarks/{name} reads {SHARED_DATA / NEEDS_SHARED_DATA[name]}, which is absent")
    prefix, _ = SMALL_RUNS[name]
    done = small_runs[name]
    assert done.returncode == 0, f"benchmarks/{name} exit {done.returncode}:\n{done.stderr[-3000:]}"
    figures = [line for line in done.stdout.splitlines() if line.startswith(f"{prefix}: ")]
    assert figures and FIGURES_LINE.match(figures[-1]), done.stdout[-2000:]


@pytest.mark.slow
def test_gpu_check_smoke_mode_runs_through_its_shell_script(small_runs):
    done = small_runs[GPU_SMOKE]
    assert done.returncode == 0, done.stderr[-3000:]
    figures = [line for line in done.stdout.splitlines() if line.startswith("gpu_check: ")]
    assert figures and "smoke=1" in figures[-1] and FIGURES_LINE.match(figures[-1]), done.stdout[-2000:]
