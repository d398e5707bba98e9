"""Joining a multi-host run: `jax.distributed.initialize` from the engine's flags (vLLM's
--nnodes, --node-rank, --master-addr, --master-port), before anything touches a device.

Left unset, the coordinator address, process count and rank come from the environment
JAX already reads (SLURM, Open MPI, Kubernetes JobSet). After it, `jax.devices()` lists
every process's devices, so a tensor-parallel mesh spans the hosts with the same code.
"""

from __future__ import annotations

import logging

import jax

logger = logging.getLogger(__name__)


def initialize_distributed(
    nnodes: int, node_rank: int | None, master_addr: str | None, master_port: int | None
) -> None:
    if nnodes == 1 or jax.distributed.is_initialized():
        return
    address = None if master_addr is None else f"{master_addr}:{master_port or 29501}"
    # CPU hosts (tests, CPU-only clusters) run the model's collectives over gloo.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=address, num_processes=nnodes, process_id=node_rank)
    logger.info(
        "Joined a %d-process run as process %d: %d devices in all, %d here.",
        jax.process_count(),
        jax.process_index(),
        jax.device_count(),
        jax.local_device_count(),
    )
