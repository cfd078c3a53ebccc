"""The tree shows the architecture and the imports follow it: `pallas_kernels/` (kernels beside their
pure-JAX twins) and the `sharding/` library import nothing from `v4jax`; `v4jax/` imports nothing from
the tools built on it (`benchmarks/`, `train.py`, `infer.py`); nothing imports in a circle. Every import
counts, the ones inside functions too."""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("v4jax", "sharding", "pallas_kernels", "benchmarks")
TOOLS = ("benchmarks", "train", "infer")  # need the whole model; nothing below imports them


def _modules() -> dict[str, str]:
    mods = {}
    for top in PACKAGES:
        for dirpath, dirs, files in os.walk(os.path.join(ROOT, top)):
            dirs[:] = [d for d in dirs if not d.startswith((".", "__"))]
            for f in files:
                if f.endswith(".py"):
                    name = os.path.relpath(os.path.join(dirpath, f), ROOT)[:-3].replace(os.sep, ".")
                    mods[name.removesuffix(".__init__")] = os.path.join(dirpath, f)
    for f in os.listdir(ROOT):
        if f.endswith(".py"):
            mods[f[:-3]] = os.path.join(ROOT, f)
    return mods


def _graph() -> dict[str, set[str]]:
    """module -> the project modules it imports (resolved to the longest existing module name)."""
    mods = _modules()

    def resolve(name):
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for mod, path in mods.items():
        pkg = mod if path.endswith("__init__.py") else mod.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)]
                    base = ".".join(parts + ([base] if base else []))
                # `from pkg import mod` imports pkg.mod; `from mod import name` imports mod
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for n in names:
                target = resolve(n)
                # a submodule importing its own package runs nothing new (the package loads first)
                if target and target != mod and not mod.startswith(target + "."):
                    edges.add(target)
        graph[mod] = edges
    return graph


def test_lower_layers_never_import_higher_ones():
    bad = []
    for mod, edges in _graph().items():
        top = mod.split(".")[0]
        for target in edges:
            t = target.split(".")[0]
            if top in ("pallas_kernels", "sharding") and t == "v4jax":
                bad.append(f"{mod} -> {target}")
            if top == "pallas_kernels" and t == "sharding":
                bad.append(f"{mod} -> {target}")
            if top in ("v4jax", "sharding", "pallas_kernels") and t in TOOLS:
                bad.append(f"{mod} -> {target}")
    assert not bad, "imports against the layering:\n" + "\n".join(sorted(bad))


def test_no_import_cycles():
    graph = _graph()
    state, cycles = {}, []

    def visit(mod, stack):
        state[mod] = "open"
        for target in sorted(graph.get(mod, ())):
            if state.get(target) == "open":
                cycles.append(" -> ".join(stack[stack.index(target):] + [target]))
            elif target not in state:
                visit(target, stack + [target])
        state[mod] = "done"

    for mod in sorted(graph):
        if mod not in state:
            visit(mod, [mod])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)
