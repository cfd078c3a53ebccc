"""Where the DeepSeek-V4.1 golden fixtures are (tests/fixtures/deepseek_v41/, README there), for the
V4.1 tests: `V4JAX_V41_FIXTURES` if set, else the copy in the repository."""

import os

import numpy as np
import pytest

FIXTURES = os.environ.get("V4JAX_V41_FIXTURES") or os.path.join(os.path.dirname(__file__), "fixtures", "deepseek_v41")
needs_fixtures = pytest.mark.skipif(not os.path.isdir(FIXTURES), reason=f"no V4.1 fixtures at {FIXTURES}")


def load(name: str) -> np.ndarray:
    return np.load(os.path.join(FIXTURES, name))
