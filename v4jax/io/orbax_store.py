"""The converter's Orbax layout, read by `convert` (to resume and verify) and `restore` (to load):
a directory with `manifest.json` (format, completeness, every tensor's name, shape and dtype) and the
tensors as one Orbax tree of numpy arrays under `tensors/`."""

from __future__ import annotations

import json
import os

import numpy as np

MANIFEST = "manifest.json"


class ConvertError(ValueError):
    """A conversion that cannot proceed: unusable source or target, or a failed verification."""


def orbax_v1():
    try:
        from orbax.checkpoint import v1 as ocp
        ocp.partial  # noqa: B018  (the partial-save API; older Orbax lacks it)
    except (ImportError, AttributeError):
        from orbax.checkpoint.experimental import v1 as ocp
    return ocp


def read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ConvertError(f"{path} is not valid JSON: {e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConvertError(f"{path}: unreadable ({e})") from None


# --------------------------------------------------------------------------------------------------
# Sources: a list of (name, shape, dtype) known before any data is read, and a tensor iterator

def complete_manifest(directory: str) -> dict:
    p = os.path.join(directory, MANIFEST)
    if not os.path.exists(p):
        raise ConvertError(f"{directory}: no {MANIFEST}; not a checkpoint written by v4jax.io.convert")
    m = read_json(p)
    if m.get("format") != "v4jax-orbax":
        raise ConvertError(f"{p}: not a v4jax Orbax manifest")
    if not m.get("complete"):
        raise ConvertError(f"{directory}: conversion is not complete (interrupted or failed verification); "
                           f"run `python -m v4jax.io.convert` again to resume it")
    return m


def load_numpy(path: str, specs) -> dict[str, np.ndarray]:
    """Restore a subset of the Orbax tree as host numpy arrays."""
    ocp = orbax_v1()
    ctx = ocp.Context()
    ctx.pytree.loading.partial_load = True
    with ctx:  # Orbax refuses relative paths
        return dict(ocp.load(os.path.abspath(path), {n: np.empty(shape, dt) for n, shape, dt in specs}))
