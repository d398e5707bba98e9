"""Token embedding lookup over a table split by vocabulary rows (Megatron's
VocabParallelEmbedding): each device looks up the ids in its own slice of the
vocabulary, zeros the rest, and one all-reduce sums the slices. Exact, since every
token's row is non-zero on one device only."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jllm.distributed.mesh import TP_AXIS, tp_axis_if_divisible


def embed_tokens(table: jax.Array, input_ids: jax.Array, mesh: Mesh | None) -> jax.Array:
    """table [V, D] (split along V where V divides over the mesh), input_ids [T] -> [T, D]."""
    if tp_axis_if_divisible(mesh, table.shape[0]) is None:
        return table[input_ids]

    def local(shard, ids):
        rows = shard.shape[0]
        local_ids = ids - jax.lax.axis_index(TP_AXIS) * rows
        mine = (local_ids >= 0) & (local_ids < rows)
        x = jnp.where(mine[:, None], shard[jnp.clip(local_ids, 0, rows - 1)], jnp.zeros((), shard.dtype))
        return jax.lax.psum(x, TP_AXIS)

    return jax.shard_map(local, mesh=mesh, in_specs=(P(TP_AXIS, None), P()), out_specs=P())(table, input_ids)
