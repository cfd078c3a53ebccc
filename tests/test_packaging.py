"""What a fresh machine gets: every third-party module the project imports (lazy imports included) is
installed by a distribution that pyproject.toml declares. `.ci/run` proves the same end to end in a
brand-new virtual environment; this catches it in the default suite, in a second."""

import ast
import os
import re
import sys
import tomllib
from importlib import metadata

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# installed by a declared distribution without being one: jaxlib and libtpu come with jax (jax[tpu])
IMPLIED = {"jaxlib": "jax", "libtpu": "jax"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared() -> set[str]:
    project = tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))["project"]
    specs = list(project["dependencies"]) + [d for extra in project["optional-dependencies"].values() for d in extra]
    return {_norm(re.split(r"[\s\[<>=!~;]", s, maxsplit=1)[0]) for s in specs}


def _imports():
    """(top-level module name, file) for every absolute import in the repository's Python files."""
    for dirpath, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith((".", "__")) and d not in ("build", "runs")]
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(dirpath, f)
                for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
                    if isinstance(node, ast.Import):
                        for a in node.names:
                            yield a.name.split(".")[0], path
                    elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                        yield node.module.split(".")[0], path


def test_every_imported_third_party_module_is_declared_in_pyproject():
    declared = _declared()
    local = {n[:-3] if n.endswith(".py") else n for n in os.listdir(ROOT)}
    local |= {f[:-3] for _, _, fs in os.walk(ROOT) for f in fs if f.endswith(".py")}
    dists = metadata.packages_distributions()
    missing = {}
    for top, path in _imports():
        if top in sys.stdlib_module_names or top in local or top == "__future__":
            continue
        providers = {_norm(d) for d in dists.get(top, [])} | ({IMPLIED[top]} if top in IMPLIED else set())
        if not providers & declared:
            missing.setdefault(top, set()).add(os.path.relpath(path, ROOT))
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"


def test_the_test_extra_does_not_pull_libtpu():
    extras = tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))["project"]["optional-dependencies"]
    assert not any("tpu" in d for d in extras["test"]), "libtpu (684 MB) belongs to the `tpu` extra only"
