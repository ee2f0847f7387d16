"""What a plain install needs is declared: every third-party module the package imports comes from a
distribution in pyproject's `dependencies` (imported at module level) or at least in an extra (imported
lazily, inside a function or under `try/except ImportError`). The install itself (a wheel in a fresh
virtual environment, no extras) is checked by `.ci/install_check.sh`, which CI runs."""

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
OWN = {"fused_birnn", "kernels"}


def _name(req: str) -> str:
    return re.split(r"[\s<>=!~;\[]", req, maxsplit=1)[0].lower().replace("_", "-")


def _imports(path: Path) -> tuple[set[str], set[str]]:
    """(eager, lazy) top-level module names imported by `path`: eager at module level outside any
    try/except ImportError, lazy anywhere else."""
    tree = ast.parse(path.read_text(), str(path))
    eager, lazy = set(), set()

    def visit(node, is_lazy):
        for child in ast.iter_child_nodes(node):
            child_lazy = is_lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Try))
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                names = [child.module]
            else:
                visit(child, child_lazy)
                continue
            (lazy if is_lazy else eager).update(n.split(".")[0] for n in names)

    visit(tree, False)
    return eager, lazy


def _distributions(module: str) -> set[str]:
    return {d.lower().replace("_", "-") for d in importlib.metadata.packages_distributions().get(module, [])}


def test_every_imported_module_is_declared():
    deps = {_name(r) for r in PYPROJECT["project"]["dependencies"]}
    extras = {_name(r) for reqs in PYPROJECT["project"]["optional-dependencies"].values() for r in reqs}
    files = sorted((ROOT / "fused_birnn").rglob("*.py")) + sorted((ROOT / "kernels").rglob("*.py"))
    assert len(files) > 10
    problems = []
    for f in files:
        eager, lazy = _imports(f)
        for mod, allowed in [(m, deps) for m in eager] + [(m, deps | extras) for m in lazy - eager]:
            if mod in OWN or mod in sys.stdlib_module_names:
                continue
            dists = _distributions(mod)
            if not dists & allowed:
                problems.append(f"{f.relative_to(ROOT)} imports {mod} (from {sorted(dists) or '?'}), not declared")
    assert not problems, "\n".join(problems)


def test_runtime_needs_are_declared():
    deps = {_name(r) for r in PYPROJECT["project"]["dependencies"]}
    # numpy: imported by Triton's interpreter, not by our code, so the scan above cannot see it
    assert {"torch", "triton", "numpy", "tqdm"} <= deps
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert {_name(r) for r in extras["export"]} == {"onnx", "onnxscript", "onnxruntime"}
    test = {_name(r) for r in extras["test"]}
    assert "fused-birnn" in test and any("export" in r and "bench" in r for r in extras["test"])
    assert {"pytest", "expecttest"} <= test


def test_license_file_is_the_declared_one():
    assert PYPROJECT["project"]["license"] == "Apache-2.0"
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text.splitlines()[1] and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text


def test_ci_runs_the_plain_install_check():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "bash .ci/install_check.sh" in ci
    check = (ROOT / ".ci" / "install_check.sh").read_text()
    assert "pip install --no-compile torch==2.13.0" in check  # the CPU wheel, before the package's deps
    assert "TRITON_INTERPRET=1" in check and "env -u TRITON_INTERPRET" in check
    assert "-m fused_birnn.bench --suite tiny" in check


def test_ci_runs_the_oldest_stack():
    """Besides the current stack, CI runs the kernels' interpreter tests and the compile checks under the
    oldest triton we claim (the GPU machines' 3.6.0) with numpy 2.4."""
    assert "bash .ci/oldest_stack.sh" in (ROOT / ".ci" / "run").read_text()
    check = (ROOT / ".ci" / "oldest_stack.sh").read_text()
    assert "torch==2.13.0 triton==3.6.0 \"numpy==2.4.*\"" in check
    floor = next(r for r in PYPROJECT["project"]["dependencies"] if _name(r) == "triton")
    assert floor == "triton>=3.6"
    for f in ("test_kernels.py", "test_kernels_gated.py", "test_kernels_gated_backward.py", "test_split.py",
              "test_plan_kinds.py", "test_plans.py", "test_compile.py"):
        assert f"tests/{f}" in check, f
