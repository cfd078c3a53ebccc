"""Import every module of the project (packages, top-level scripts, benchmarks): run in a brand-new
virtual environment after the README's install command, it fails on any import the install did not
provide. Tests are left out (pytest imports them). Usage: python .ci/import_all.py [ROOT]"""
import importlib
import os
import sys

root = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, root)
names = []
for top in ("v4jax", "sharding", "pallas_kernels", "benchmarks"):
    for dirpath, dirs, files in os.walk(os.path.join(root, top)):
        dirs[:] = [d for d in dirs if not d.startswith((".", "__"))]
        for f in sorted(files):
            if f.endswith(".py") and f != "__main__.py":  # importing a __main__ runs the command
                rel = os.path.relpath(os.path.join(dirpath, f), root)[:-3].replace(os.sep, ".")
                names.append(rel.removesuffix(".__init__"))
names += [f[:-3] for f in sorted(os.listdir(root)) if f.endswith(".py")]  # train.py, infer.py
failed = []
for name in names:
    try:
        importlib.import_module(name)
    except Exception as e:  # noqa: BLE001 - report every module, then fail
        failed.append(f"{name}: {type(e).__name__}: {e}")
print(f"imported {len(names) - len(failed)} of {len(names)} modules")
if failed:
    print("\n".join(failed), file=sys.stderr)
    sys.exit(1)
