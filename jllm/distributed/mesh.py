"""The device mesh an engine runs on, and the sharding rules every part reads from it.

An engine (one data-parallel replica) runs on a one-axis `Mesh` of
`tensor_parallel_size` devices named `TP_AXIS`: weights are split Megatron-style along
it (families annotate their parameters, `layers/params.py`), KV pages by kv head, and
XLA inserts the collectives. Replica r of a data-parallel group takes the r-th run of
`tensor_parallel_size` devices of `jax.devices()`, which spans every process once
`jax.distributed` is initialized.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jllm.config import ParallelConfig

TP_AXIS = "tp"


def make_mesh(parallel_config: ParallelConfig) -> Mesh:
    """This replica's devices as a one-axis tensor-parallel mesh."""
    tp, dp = parallel_config.tensor_parallel_size, parallel_config.data_parallel_size
    devices = jax.devices()
    if tp * dp > len(devices):
        raise ValueError(
            f"World size ({tp * dp}: tensor_parallel_size={tp} x data_parallel_size={dp}) is larger than "
            f"the number of available devices ({len(devices)})."
        )
    rank = parallel_config.data_parallel_rank
    return Mesh(np.array(devices[rank * tp : (rank + 1) * tp]), (TP_AXIS,))


def tp_size(mesh: Mesh | None) -> int:
    return 1 if mesh is None else mesh.shape[TP_AXIS]


def tp_axis_if_divisible(mesh: Mesh | None, dim: int) -> str | None:
    """TP_AXIS where `dim` splits evenly over the mesh (and there is more than one device),
    else None: such a tensor is replicated (an odd vocabulary or ffn size)."""
    n = tp_size(mesh)
    return TP_AXIS if n > 1 and dim % n == 0 else None


def verify_tensor_parallel(num_attention_heads: int, num_key_value_heads: int, tensor_parallel_size: int) -> None:
    """vLLM's rules: the query heads split evenly; the kv heads split evenly, or, where
    there are fewer than devices, each is replicated on a whole number of them."""
    tp = tensor_parallel_size
    if num_attention_heads % tp:
        raise ValueError(
            f"Total number of attention heads ({num_attention_heads}) must be divisible by tensor parallel size ({tp})."
        )
    if num_key_value_heads % tp and tp % num_key_value_heads:
        raise ValueError(
            f"Total number of key-value heads ({num_key_value_heads}) must be divisible by tensor parallel size "
            f"({tp}), or tensor parallel size by it."
        )


def num_kv_cache_heads(num_key_value_heads: int, mesh: Mesh | None) -> int:
    """KV heads in the pool across the mesh: each device holds at least one, so where the
    model has fewer kv heads than devices each is replicated (vLLM's num_kv_head_replicas)."""
    return max(num_key_value_heads, tp_size(mesh))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())
