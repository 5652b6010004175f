"""The package's layering, read from the source (every import statement, inside functions too).

The layers are the README's Layout section: entry points -> pipeline -> stages -> pieces -> foundation.
A module may import its own layer or a lower one, never a higher one; the import graph has no cycle;
MLflow is imported by `raylm/tracking.py` only (and by the pyfunc model MLflow loads from code); the model imports neither Ray, MLflow nor lm-eval; and an
import inside a function is either in an entry point (kept light so `raylm --help` and config errors
return before torch and Ray load) or says why it is deferred.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "raylm"

ENTRY, PIPELINE, STAGES, PIECES, FOUNDATION = 4, 3, 2, 1, 0
STAGE_MODULES = {"raylm.stage", "raylm.stage_plan", "raylm.plan", "raylm.tune", "raylm.data.curate",
                 "raylm.data.tokenize", "raylm.data.sft", "raylm.train.launch", "raylm.finetune.stage",
                 "raylm.eval.suite", "raylm.eval.command", "raylm.report_stage"}
FOUNDATION_MODULES = {"raylm", "raylm.config", "raylm.model.config", "raylm.storage", "raylm.gpus", "raylm.workspace",
                      "raylm.artifacts", "raylm.runtime", "raylm.tracking", "raylm.failure", "raylm.console",
                      "raylm.recipe"}


def layer(module: str) -> int:
    if module in {"raylm.cli", "raylm.__main__", "raylm.eval.__main__"}:
        return ENTRY
    if module == "raylm.pipeline":
        return PIPELINE
    if module in STAGE_MODULES:
        return STAGES
    if module in FOUNDATION_MODULES:
        return FOUNDATION
    return PIECES  # model/, data/ per-batch functions, train/ worker code, eval/ actors and tasks, finetune methods


def modules() -> dict[str, ast.Module]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        found[name] = ast.parse(path.read_text(), str(path))
    return found


def imported(node: ast.Import | ast.ImportFrom) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    return [base] + [f"{base}.{alias.name}" for alias in node.names]


def import_edges(trees: dict[str, ast.Module]) -> dict[str, set[str]]:
    edges = {}
    for name, tree in trees.items():
        edges[name] = {target for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                       for target in imported(node) if target in trees and target != name}
    return edges


def external_imports(tree: ast.Module) -> set[str]:
    return {target.split(".")[0] for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
            for target in imported(node)[:1]}


@pytest.fixture(scope="module")
def trees() -> dict[str, ast.Module]:
    return modules()


def test_every_module_is_in_a_layer_and_imports_none_above_it(trees):
    upward = [f"{module} (layer {layer(module)}) imports {target} (layer {layer(target)})"
              for module, targets in import_edges(trees).items() for target in sorted(targets)
              if layer(target) > layer(module)]
    assert not upward, "\n".join(upward)


def test_the_import_graph_has_no_cycle(trees):
    edges = import_edges(trees)
    state: dict[str, int] = {}
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(edges[module]):
            if state.get(target) == 1:
                cycles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in state:
                visit(target, path + [target])
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert not cycles, "\n".join(cycles)


def test_only_tracking_imports_mlflow_and_the_model_imports_no_ray_mlflow_or_lm_eval(trees):
    mlflow_users = sorted(name for name, tree in trees.items() if "mlflow" in external_imports(tree))
    # the pyfunc model MLflow itself loads (models from code) is an MLflow class by necessity
    assert mlflow_users == ["raylm.serving.pyfunc_model", "raylm.tracking"]
    model_deps = {name: external_imports(tree) & {"ray", "mlflow", "lm_eval"} for name, tree in trees.items()
                  if name.startswith("raylm.model")}
    assert not any(model_deps.values()), model_deps


def test_an_import_inside_a_function_is_in_an_entry_point_or_says_why_it_is_deferred():
    unexplained = []
    for path in PACKAGE.rglob("*.py"):
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if layer(module.removesuffix(".__init__")) == ENTRY:
            continue
        lines = path.read_text().splitlines()
        tree = ast.parse("\n".join(lines))
        for function in ast.walk(tree):
            if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(function):
                if not isinstance(node, (ast.Import, ast.ImportFrom)):
                    continue
                row = node.lineno - 2  # walk up over the imports, blanks and comments just above it
                explained = "# deferred" in lines[node.lineno - 1]
                while row >= 0 and not explained:
                    text = lines[row].strip()
                    if text.startswith("# deferred"):
                        explained = True
                    elif not (text == "" or text.startswith(("import ", "from ", "#", ")", "try:"))
                              or text.endswith(",")):
                        break
                    row -= 1
                if not explained:
                    unexplained.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: {ast.unparse(node)}")
    assert not unexplained, "\n".join(unexplained)
