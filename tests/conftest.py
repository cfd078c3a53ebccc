import os

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# 8 host CPU devices for the sharding tests (set before jax initialises its backend); tests that do
# not shard run on the first device as before.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
# libtpu (TPU AOT compile tests) takes a machine-wide lock unless told a compile-only client may share
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def tpu_devices_or_skip(topology: str):
    """The devices of a TPU topology for ahead-of-time compile tests (libtpu from PyPI, no TPU needed),
    as the dry run builds them; skips the test where libtpu is missing or cannot start."""
    from benchmarks.dryrun import tpu_devices

    try:
        return tpu_devices(topology)
    except SystemExit as e:  # tpu_devices' one-line refusal: no libtpu, or it cannot describe the topology
        pytest.skip(str(e))


# Tests that compile for a TPU topology need libtpu (the `tpu` extra): marked `tpu` so CI can run just
# them after installing it (`pytest -m tpu`); without libtpu they skip with the reason (above).
_NEEDS_LIBTPU = ("tpu_devices_or_skip", "compile_for_tpu", "_tpu_mesh(")


def pytest_collection_modifyitems(config, items):
    import inspect

    for item in items:
        fn = getattr(item, "function", None)
        try:
            src = inspect.getsource(fn) if fn is not None else ""
        except (OSError, TypeError):
            src = ""
        if item.module.__name__ == "test_dryrun" or any(s in src for s in _NEEDS_LIBTPU):
            item.add_marker(pytest.mark.tpu)


def _compilation_cache_settings():
    import jax

    return {k: getattr(jax.config, k) for k in ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")}


_BASELINE: dict = {}  # the compilation cache settings the session started with


def _restore_compilation_cache():
    if _compilation_cache_settings() != _BASELINE:
        import jax
        from jax._src import compilation_cache

        for k, v in _BASELINE.items():
            jax.config.update(k, v)
        compilation_cache.reset_cache()


@pytest.fixture(autouse=True)
def _no_leaked_compilation_cache():
    """train.py's loop points JAX's persistent compilation cache at the run's cache directory for the rest of
    the process. A test (or a module fixture) that trains in-process must not leave the later tests of the
    session reading and writing that cache (their results would depend on what earlier tests compiled):
    every test starts and ends with the session's own settings."""
    if not _BASELINE:
        _BASELINE.update(_compilation_cache_settings())
    _restore_compilation_cache()
    yield
    _restore_compilation_cache()


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Every XLA:CPU executable keeps its code in memory mappings of its own until JAX's caches drop it;
    a session of ~900 tests keeps thousands alive and reaches the kernel's limit on mappings per process
    (vm.max_map_count, 65,530 by default: the full suite's core dump had 65,382), where the next compile
    or cache load segfaults inside XLA. Each test module's programs are dropped when it ends."""
    yield
    import gc

    import jax

    jax.clear_caches()
    gc.collect()
