"""Training checkpoints (Orbax): the whole state, async, keep-last-N, a sha256 manifest written last and
verified at restore, fallback to the previous step when one is unusable.

State (one pytree, checkpointed whole): params and buffers as flat `{dotted path: array}` dicts
(fp32 master weights, architecture.md §8.6), the optimiser state (fp32), the step and an RNG key; the data
iterator's (epoch, batch) and a per-parameter fingerprint travel beside it as JSON."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Callable

import jax
import jax.numpy as jnp

from v4jax.train.data import IteratorState
from v4jax.train.step import all_finite

# --------------------------------------------------------------------------------------------------
# Checkpoints (Orbax): async, keep-last-N, atomic (Orbax writes a temporary directory and renames it
# into place when complete). Integrity: once Orbax has finished a step directory, process 0 writes
# MANIFEST into it, last: the size and sha256 of every file. Restore verifies the manifest, reads the
# state back and checks it is finite; a checkpoint failing any of these is reported and the previous
# one tried. Nothing is moved or deleted without a message.

MANIFEST = "v4jax_manifest.json"


class CheckpointError(RuntimeError):
    """No usable checkpoint although some exist."""


def _fingerprint(params: dict) -> dict:
    """Per-parameter sum of |w|, saved in `meta` (restore.py checks it when loading a run for inference)."""
    return {k: jnp.sum(jnp.abs(v.astype(jnp.float32))) for k, v in params.items()}


def _flatten_opt(state: dict) -> dict:
    leaves = jax.tree.leaves(state["opt"])
    return {**state, "opt": {f"{i:05d}": x for i, x in enumerate(leaves)}}


def _unflatten_opt(flat: dict, like: dict) -> dict:
    treedef = jax.tree.structure(like["opt"])
    return {**flat, "opt": jax.tree.unflatten(treedef, [flat["opt"][f"{i:05d}"] for i in range(treedef.num_leaves)])}


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _step_files(step_dir: str) -> list[str]:
    return sorted(os.path.relpath(os.path.join(r, f), step_dir) for r, _, fs in os.walk(step_dir) for f in fs
                  if f != MANIFEST)


def write_manifest(step_dir: str) -> None:
    """{relative path: {size, sha256}} of every file of a finished step directory, written last
    (temporary name, then an atomic rename)."""
    files = {rel: {"size": os.path.getsize(os.path.join(step_dir, rel)), "sha256": _sha256(os.path.join(step_dir, rel))}
             for rel in _step_files(step_dir)}
    tmp = os.path.join(step_dir, MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"format": 1, "files": files}, f, indent=0)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(step_dir, MANIFEST))


def verify_manifest(step_dir: str) -> str | None:
    """None when every file listed in the step's manifest has its recorded size and sha256, else the
    first discrepancy in words. A step without a manifest was finished by Orbax but not yet checksummed
    (killed in between, or written before manifests existed): it is reported by the caller and trusted
    only as far as Orbax's own atomic rename and the finiteness check go."""
    path = os.path.join(step_dir, MANIFEST)
    if not os.path.exists(path):
        return "no manifest"
    try:
        with open(path) as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"unreadable manifest ({type(e).__name__})"
    for rel, want in sorted(files.items()):
        full = os.path.join(step_dir, rel)
        if not os.path.exists(full):
            return f"{rel} is missing"
        if os.path.getsize(full) != want["size"]:
            return f"{rel} has {os.path.getsize(full)} bytes, the manifest says {want['size']}"
        if _sha256(full) != want["sha256"]:
            return f"{rel} does not match its sha256 checksum"
    return None


class Checkpointer:
    def __init__(self, directory: str, keep: int, use_async: bool):
        import orbax.checkpoint as ocp
        self.ocp = ocp
        self.directory = os.path.abspath(directory)
        self.keep, self.use_async = keep, use_async
        self._pending: list[int] = []  # steps saved whose manifest is not written yet
        self._open()
        self._finite = jax.jit(all_finite)
        self._fp = jax.jit(_fingerprint)

    def _open(self):
        ocp = self.ocp
        self.mngr = ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(
            max_to_keep=self.keep, enable_async_checkpointing=self.use_async, create=True,
            cleanup_tmp_directories=True))

    def steps(self) -> list[int]:
        return sorted(self.mngr.all_steps())

    def step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def save(self, state: dict, iterator: IteratorState, wait: bool = False,
             log: Callable[[str], None] = print) -> bool:
        """Save (async unless configured otherwise or `wait`); False, with a message, when the state is
        not finite: such a state is never written."""
        step = int(jax.device_get(state["step"]))
        if not bool(jax.device_get(self._finite(state))):
            log(f"not saving a checkpoint at step {step}: the state holds non-finite values")
            return False
        fp = {k: float(v) for k, v in jax.device_get(self._fp(state["params"])).items()}
        # Orbax finishes the previous async save before starting this one anyway; waiting here first
        # lets its manifest be written even when saves follow each other too closely for `poll` to
        # ever see Orbax idle.
        self.wait()
        ocp = self.ocp
        self.mngr.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(_flatten_opt(state)),
            data=ocp.args.JsonSave(iterator.to_dict()),
            meta=ocp.args.JsonSave({"step": step, "fingerprint": fp})), force=True)
        self._pending.append(step)
        if wait or not self.use_async:
            self.wait()
        return True

    def poll(self):
        """Write the manifests of saves Orbax has finished (cheap when none; called every step)."""
        if self._pending and not self.mngr.is_saving_in_progress():
            self._write_manifests()

    def _write_manifests(self):
        if jax.process_index() == 0:
            for step in self._pending:
                if os.path.isdir(self.step_dir(step)):  # not already dropped by keep_checkpoints
                    write_manifest(self.step_dir(step))
        self._pending = []  # (no cross-host sync: each host polls on its own schedule; only process 0 writes)

    def restore_latest(self, abstract_state: dict, log: Callable[[str], None]) -> tuple[dict, IteratorState] | None:
        """The newest checkpoint that passes its manifest, reads back and holds a finite state. Newer
        ones that fail are reported and then moved aside (`<dir>/corrupt-<step>`, said so) so that new
        saves can take their step numbers; when none is usable nothing is moved and CheckpointError says so."""
        ocp = self.ocp
        steps = self.steps()
        if not steps:
            return None
        target = _flatten_opt(abstract_state)
        bad = []
        for step in reversed(steps):
            problem = verify_manifest(self.step_dir(step))
            if problem == "no manifest":
                log(f"checkpoint step {step} has no manifest (interrupted before its checksums were written); "
                    f"using it unverified")
                problem = None
            got = None
            if problem is None:
                try:
                    got = self.mngr.restore(step, args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore(),
                        meta=ocp.args.JsonRestore()))
                    iterator = IteratorState.from_dict(got["data"])
                    if not bool(jax.device_get(self._finite(got["state"]))):
                        problem = "the restored state holds non-finite values"
                except Exception as e:  # any read error (truncated file, bad JSON, shape mismatch) = unusable
                    reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
                    problem = f"{type(e).__name__}: {reason}" if reason else type(e).__name__
            if problem is not None:
                log(f"checkpoint step {step} in {self.directory} is corrupt or unreadable ({problem}); "
                    f"falling back to the previous one")
                bad.append(step)
                continue
            if bad and jax.process_index() == 0:
                for b in bad:
                    aside = self._aside(b)
                    os.replace(self.step_dir(b), aside)
                    log(f"moved the unusable checkpoint step {b} aside to {aside} (kept for inspection)")
            if bad:
                _sync("corrupt-checkpoints-moved")
                self.mngr.close()
                self._open()
            return _unflatten_opt(got["state"], abstract_state), iterator
        raise CheckpointError(f"no usable checkpoint in {self.directory} (steps {steps} all failed, see above); "
                              f"nothing was moved or deleted. Pass --fresh (fresh=true) to start from step 0; "
                              f"the old checkpoints are then moved aside, not deleted")

    def _aside(self, step: int) -> str:
        n, aside = 1, os.path.join(self.directory, f"corrupt-{step}")
        while os.path.exists(aside):  # never overwrite an earlier one
            n += 1
            aside = os.path.join(self.directory, f"corrupt-{step}.{n}")
        return aside

    def wait(self):
        self.mngr.wait_until_finished()
        self._write_manifests()

    def close(self):
        self.wait()
        self.mngr.close()


def _sync(name: str):
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)
