"""Benchmark scripts (`python -m benchmarks` runs them all; see BENCHMARKS.md)."""


def quiet_transformers() -> None:
    """Silence transformers' info logging and progress bars (they interleave with the tables)."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
