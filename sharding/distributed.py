"""Multi-host start-up: `jax.distributed.initialize` from flags, the environment, or a TPU pod.

Order of precedence: explicit arguments (command-line flags) > V4JAX_COORDINATOR /
V4JAX_NUM_PROCESSES / V4JAX_PROCESS_ID > the cluster's own environment (Cloud TPU pods, GKE, SLURM:
`jax.distributed.initialize()` discovers everything) > single process (nothing to do).
CPU runs across processes (tests, local rehearsal) use gloo collectives.
"""

from __future__ import annotations

import os

import jax

_CLUSTER_HINTS = ("TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "JOBSET_NAME")


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               local_device_ids: list[int] | None = None) -> bool:
    """Join the job. Returns True when running multi-process. Must run before any other JAX call."""
    env = os.environ
    coordinator = coordinator or env.get("V4JAX_COORDINATOR")
    if num_processes is None and "V4JAX_NUM_PROCESSES" in env:
        num_processes = int(env["V4JAX_NUM_PROCESSES"])
    if process_id is None and "V4JAX_PROCESS_ID" in env:
        process_id = int(env["V4JAX_PROCESS_ID"])
    if coordinator or num_processes or process_id is not None:
        missing = [n for n, v in (("coordinator", coordinator), ("num_processes", num_processes),
                                  ("process_id", process_id)) if v is None]
        if missing:
            raise ValueError(f"multi-host start needs coordinator, num_processes and process_id; missing {missing}")
        if not 0 <= process_id < num_processes:
            raise ValueError(f"process_id {process_id} is outside [0, {num_processes})")
        if "cpu" in os.environ.get("JAX_PLATFORMS", "") or jax.config.jax_platforms == "cpu":
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id, local_device_ids=local_device_ids)
        return num_processes > 1
    if any(h in env for h in _CLUSTER_HINTS):
        jax.distributed.initialize()  # the platform tells JAX the coordinator and this host's rank
        return jax.process_count() > 1
    return False
