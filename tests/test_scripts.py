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
    "dedup.py": ("dedup", ["--docs", "60", "--no-gutenberg", "--repeats", "1", "--largest-scale", "2"]),
    "eval.py": ("eval", ["--limit", "4", "--d-model", "32", "--layers", "1", "--seq-len", "64", "--batch-size", "4"]),
    "finetune.py": ("finetune", ["--d-model", "32", "--layers", "1", "--heads", "2", "--seq-len", "64", "--batch", "2",
                                 "--steps", "3", "--warmup", "1"]),
    "finetune_layouts.py": ("finetune_layouts", ["--layouts", "alpaca", "--conversations", "24", "--steps", "2",
                                                 "--d-model", "32", "--layers", "1"]),
    "pii.py": ("pii", ["--docs", "60", "--repeats", "1"]),
    "model.py": ("model", ["--batch", "2", "--seq", "32", "--rounds", "1", "--steps", "1", "--gen-batch", "1",
                           "--gen-prompt", "4", "--gen-tokens", "4"]),
    "recipe.py": ("recipe", ["--small"]),
    "sandbox.py": ("sandbox", ["--programs", "4", "--workers", "2", "--repeats", "1"]),
    "storage.py": ("storage", ["--repeats", "1", "--sizes", "tiny", "--train-steps", "10"]),
    "tokenization.py": ("tokenize", ["--mb", "0.5", "--vocab", "512", "--files", "2", "--repeats", "1"]),
    "train.py": ("train", ["--steps", "10", "--report-every", "5", "--d-model", "32", "--seq-len", "32", "--batch", "4",
                           "--micro", "2"]),
    "tune.py": ("tune", ["--samples", "2", "--steps", "6"]),
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


@pytest.mark.parametrize("where", ["repo", "elsewhere"])
def test_every_benchmark_and_job_answers_help(where, tmp_path):
    cwd = REPO if where == "repo" else tmp_path
    failures = []
    for script in [*BENCHMARKS, *JOBS]:
        done = run_script([str(script), "--help"], cwd, timeout=120)
        if done.returncode != 0 or "usage:" not in done.stdout:
            failures.append(f"{script.relative_to(REPO)} (exit {done.returncode}): {done.stderr.strip()[-400:]}")
    assert not failures, "\n".join(failures)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SMALL_RUNS))
def test_benchmark_runs_end_to_end_at_small_size(name, tmp_path):
    if name in NEEDS_SHARED_DATA and not (SHARED_DATA / NEEDS_SHARED_DATA[name]).exists():
        pytest.skip(f"benchmarks/{name} reads {SHARED_DATA / NEEDS_SHARED_DATA[name]}, which is absent")
    prefix, args = SMALL_RUNS[name]
    done = run_script([str(REPO / "benchmarks" / name), *args], tmp_path, timeout=600)
    assert done.returncode == 0, f"benchmarks/{name} exit {done.returncode}:\n{done.stderr[-3000:]}"
    figures = [line for line in done.stdout.splitlines() if line.startswith(f"{prefix}: ")]
    assert figures and FIGURES_LINE.match(figures[-1]), done.stdout[-2000:]


@pytest.mark.slow
def test_gpu_check_smoke_mode_runs_through_its_shell_script(tmp_path):
    env = {**script_env(), "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--smoke", "--steps", "10"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    figures = [line for line in done.stdout.splitlines() if line.startswith("gpu_check: ")]
    assert figures and "smoke=1" in figures[-1] and FIGURES_LINE.match(figures[-1]), done.stdout[-2000:]
