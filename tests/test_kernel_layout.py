"""kernels/ holds one Triton kernel per module, next to its launcher: a JIT function named *_kernel
is a kernel; any other JIT function is a helper that kernels call (kernels/_common.py holds the shared
ones). Read from the source, so no triton is needed."""
from __future__ import annotations

import ast
from pathlib import Path

KERNELS = Path(__file__).resolve().parents[1] / "kernels"


def _is_jit(decorator: ast.expr) -> bool:
    target = decorator.func if isinstance(decorator, ast.Call) else decorator
    return isinstance(target, ast.Attribute) and target.attr == "jit"


def jit_functions(path: Path) -> list[ast.FunctionDef]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return [node for node in tree.body
            if isinstance(node, ast.FunctionDef) and any(_is_jit(d) for d in node.decorator_list)]


def called_names(function: ast.FunctionDef) -> set[str]:
    return {node.func.id for node in ast.walk(function)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)}


def test_each_module_holds_at_most_one_kernel():
    per_module = {path.name: [f.name for f in jit_functions(path) if f.name.endswith("_kernel")]
                  for path in sorted(KERNELS.glob("*.py"))}
    crowded = {name: kernels for name, kernels in per_module.items() if len(kernels) > 1}
    assert not crowded, f"modules with several kernels: {crowded}"
    # the ops' modules, the config tables and the shared helpers hold none
    for name in ("multinomial_nll.py", "sparse_input_layer.py", "nll_configs.py", "sparse_input_configs.py",
                 "_common.py"):
        assert per_module[name] == [], name
    assert sum(map(len, per_module.values())) == 8  # the kernels the offline compile check compiles


def test_every_other_jit_function_is_a_helper_that_kernels_call():
    functions = [f for path in KERNELS.glob("*.py") for f in jit_functions(path)]
    calls = set().union(*(called_names(f) for f in functions))
    helpers = [f.name for f in functions if not f.name.endswith("_kernel")]
    assert helpers, "no JIT helper found: the parse went wrong"
    uncalled = [name for name in helpers if name not in calls]
    assert not uncalled, f"JIT functions that no kernel calls (a kernel should be named *_kernel): {uncalled}"
