"""The package's modules import one way: no module reaches itself through a chain of imports, at
module level or inside functions (an import in a function is still a dependency; hiding a circle
there only delays it), and each layer of the README's layout imports only its own and lower layers."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Module name -> source folder; the Triton kernels sit at the top of the repository but install as
# the subpackage recvae_fast.kernels (setup.py's package_dir).
PACKAGE_FOLDERS = {"recvae_fast": ROOT / "recvae_fast", "recvae_fast.kernels": ROOT / "kernels"}


def package_modules() -> dict[str, Path]:
    """Every module of the package: dotted name -> file (a package is its __init__.py)."""
    modules = {}
    for prefix, folder in PACKAGE_FOLDERS.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            name = ".".join((prefix, *parts))
            if prefix == "recvae_fast" and name.startswith("recvae_fast.kernels"):
                continue  # not a module of the installed package
            modules[name] = path
    return modules


def imported_modules(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules that `name` imports anywhere in its file."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[:len(base) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            # `from package import submodule` imports the submodule; any other name comes from `source`.
            targets = [f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else source
                       for alias in node.names]
        else:
            continue
        found.update(target for target in targets if target in modules and target != name)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = package_modules()
    return {name: imported_modules(name, path, modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in sorted(graph[node]):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_walker_sees_relative_absolute_and_in_function_imports():
    graph = import_graph()
    assert "recvae_fast.model" in graph and "recvae_fast.kernels" in graph
    assert "recvae_fast.data.errors" in graph["recvae_fast.data.readers"]  # a relative import
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_package_has_no_import_cycle():
    found = cycles(import_graph())
    assert not found, "import cycles: " + "; ".join(" <-> ".join(component) for component in found)


# The README's layout, lowest first: a module belongs to the layer of its longest listed prefix.
LAYERS = (
    ("recvae_fast", "recvae_fast.atomic", "recvae_fast.hashing", "recvae_fast.precision", "recvae_fast.workspace",
     "recvae_fast.cache_blocks", "recvae_fast.sparse", "recvae_fast.posterior_cache", "recvae_fast.testing"),
    ("recvae_fast.data",),
    ("recvae_fast.runfolder", "recvae_fast.validation"),
    ("recvae_fast.kernels", "recvae_fast.ops"),
    ("recvae_fast.model", "recvae_fast.optim", "recvae_fast.metrics", "recvae_fast.scoring"),
    ("recvae_fast.training", "recvae_fast.inference", "recvae_fast.export", "recvae_fast.report"),
    ("recvae_fast.distributed",),
    ("recvae_fast.api", "recvae_fast.runs", "recvae_fast.tuning"),
    ("recvae_fast.cli", "recvae_fast.entry", "recvae_fast.__main__"),
)


def layer_of(module: str) -> int:
    matches = [(len(prefix), level) for level, prefixes in enumerate(LAYERS) for prefix in prefixes
               if module == prefix or module.startswith(prefix + ".")]
    assert matches, f"{module} is in no layer of the layout: add it to LAYERS and to the README"
    return max(matches)[1]


def test_each_layer_imports_only_its_own_and_lower_layers():
    upward = [f"{module} -> {target}" for module, targets in sorted(import_graph().items())
              for target in sorted(targets) if layer_of(target) > layer_of(module)]
    assert not upward, "imports of a higher layer: " + "; ".join(upward)
