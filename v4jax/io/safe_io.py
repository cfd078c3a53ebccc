"""Output directories that never destroy what a user owns.

Every v4jax writer (`python -m v4jax.io.convert` in each format, `checkpoint.save_hf`, infer.py
`--write-random-checkpoint`, `python -m v4jax.parity dump --out`) goes through this module:

* `check_target`: the target must be absent or an empty directory, unless the caller was told to
  overwrite (`overwrite=True`, the `--overwrite` flag); a file in its place is always refused.
* `open_staging` / `commit`: the output is written into a sibling directory `TARGET.partial` and
  renamed onto TARGET only once it is complete and verified, so an interrupted write never leaves a
  half-written directory under the final name. The staging directory carries a marker file; only a
  marked one is ever reused or deleted, so a user's own `TARGET.partial` is refused, not removed.
* `staged`: both, as a context manager, for writers that do not resume.

Errors are one line naming the path and the flag; callers pass their own error type so each command
reports them like its other input errors.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from typing import Iterator

PARTIAL_SUFFIX = ".partial"
MARKER = ".v4jax-partial"  # inside a staging directory: it is ours to resume, replace or delete


class TargetError(ValueError):
    """An output target that cannot be written without destroying something, or at all."""


def staging_path(target: str) -> str:
    return os.path.normpath(os.fspath(target)) + PARTIAL_SUFFIX


def is_staging(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MARKER))


def check_target(target: str, *, overwrite: bool, error: type[Exception] = TargetError,
                 flag: str = "--overwrite") -> None:
    """Refuse a target that holds anything unless `overwrite`; refuse a non-directory always."""
    if os.path.lexists(target) and not os.path.isdir(target):
        raise error(f"output {target} exists and is not a directory; choose another target")
    if os.path.isdir(target) and os.listdir(target) and not overwrite:
        raise error(f"output {target} is not empty; pass {flag} to replace it, or choose another target")
    # fail now rather than after minutes of work: the nearest existing ancestor must be a writable
    # directory (the staging directory is created next to the target)
    parent = os.path.dirname(os.path.abspath(target))
    while not os.path.lexists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        why = "is not a directory" if not os.path.isdir(parent) else "is not writable"
        raise error(f"cannot write output {target}: {parent} {why}")


def open_staging(target: str, *, resume: bool = False, error: type[Exception] = TargetError) -> str:
    """Create the marked staging directory `TARGET.partial` (resume=True: keep one left by an earlier
    run, with its contents) and return its path."""
    tmp = staging_path(target)
    if os.path.lexists(tmp):
        if not is_staging(tmp):
            raise error(f"{tmp} exists and was not made by v4jax; move it away (v4jax writes {target} through it)")
        if not resume:
            shutil.rmtree(tmp)
    try:
        os.makedirs(tmp, exist_ok=True)
        with open(os.path.join(tmp, MARKER), "w"):
            pass
    except OSError as e:
        raise error(f"cannot write output {target}: {e.strerror or e} ({e.filename or tmp})") from None
    return tmp


def commit(tmp: str, target: str, *, error: type[Exception] = TargetError) -> None:
    """Rename the finished staging directory onto `target`. Whatever `target` held is moved aside
    first and deleted only once the new directory is in place (the caller has checked overwrite)."""
    os.remove(os.path.join(tmp, MARKER))
    old = None
    try:
        if os.path.isdir(target):
            if os.listdir(target):
                old = f"{os.path.normpath(target)}.replaced-{os.getpid()}"  # unique: never a user's name
                os.rename(target, old)
            else:
                os.rmdir(target)
        os.rename(tmp, target)
    except OSError as e:
        raise error(f"cannot move the finished output into {target}: {e.strerror or e} "
                    f"(it is complete in {tmp})") from None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def staged(target: str | os.PathLike, *, overwrite: bool, error: type[Exception] = TargetError,
           flag: str = "--overwrite") -> Iterator[str]:
    """`with staged(out, overwrite=...) as tmp:` write into tmp; on a normal exit tmp becomes `out`,
    on an exception it is deleted and `out` is left exactly as it was."""
    target = os.fspath(target)
    check_target(target, overwrite=overwrite, error=error, flag=flag)
    tmp = open_staging(target, error=error)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    commit(tmp, target, error=error)
