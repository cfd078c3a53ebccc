"""Two processes on loopback (CPU, gloo), 4 devices each, equal one process with 8 devices."""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from sharding.distributed import initialize

WORKER = os.path.join(os.path.dirname(__file__), "multihost_worker.py")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(args, timeout=600):
    env = {**os.environ, "PYTHONPATH": ROOT}
    env.pop("XLA_FLAGS", None)
    return subprocess.Popen([sys.executable, WORKER, *map(str, args)], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_two_processes_give_the_numbers_of_one(tmp_path):
    port = _free_port()
    procs = [_run([tmp_path / "two.npz", 2, i, port, 4]) for i in range(2)]
    single = _run([tmp_path / "one.npz", 1, 0, 0, 8])
    for p in procs + [single]:
        out, _ = p.communicate(timeout=900)
        assert p.returncode == 0, out[-3000:]
    two, one = np.load(tmp_path / "two.npz"), np.load(tmp_path / "one.npz")
    assert set(two.files) == set(one.files) and len(one.files) > 50
    for name in one.files:
        np.testing.assert_allclose(two[name], one[name], rtol=1e-5, atol=1e-7, err_msg=name)


def test_initialize_refuses_incomplete_multihost_settings(monkeypatch):
    for k in ("V4JAX_COORDINATOR", "V4JAX_NUM_PROCESSES", "V4JAX_PROCESS_ID"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(ValueError, match=r"missing \['process_id'\]"):
        initialize("127.0.0.1:1234", 2)
    with pytest.raises(ValueError, match=r"process_id 2 is outside \[0, 2\)"):
        initialize("127.0.0.1:1234", 2, 2)
