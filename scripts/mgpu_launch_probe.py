"""On the GPU: where the Mosaic GPU decode kernel's fixed time goes, by device time of
minimal Mosaic GPU kernels at its launch shape (d64 1 x 512: a cluster of 8 blocks for
each of 8 kv heads), one call per program, beside a minimal Pallas Triton kernel and the
decode kernels themselves.

    python scripts/mgpu_launch_probe.py [--calls 200]

The minimal kernels add one piece of the decode kernel at a time: an empty body; a
cluster; the cluster barrier the merge waits on; a tile's page ids read from the table
and its 8 pages brought in by TMA (the first tile of a split). The differences say what
each piece costs before any attention is computed. One more asks for the decode
kernel's shared memory (8 splits at d64) without using it.
"""
from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import pallas as pl  # noqa: E402
from jax.experimental.pallas import mosaic_gpu as plgpu  # noqa: E402
from jax.experimental.pallas import triton as pltriton  # noqa: E402

from pallas_kernels import decode_config, paged_decode_attention  # noqa: E402
from pallas_kernels.paged_decode_attention_mgpu import paged_decode_attention_mgpu  # noqa: E402
from scripts.decode_call_breakdown import events_per_call  # noqa: E402

KV_HEADS, SPLITS, PAGE, D, CONTEXT = 8, 8, 16, 64, 512
PAGES_PER_TILE = 64 // PAGE


def mosaic_probe(*, cluster: bool, barrier: bool, tma: bool, smem_kib: int = 0):
  """A Mosaic GPU kernel at the decode kernel's grid doing only the pieces asked for."""

  def kernel(table_ref, k_ref, v_ref, out_ref, k_smem, v_smem, tma_barriers, merge_barrier,
             *unused):
    kv_head = jax.lax.axis_index("kv_head")
    split = jax.lax.axis_index("split") if cluster else 0
    if tma:
      for j in range(PAGES_PER_TILE):
        page = table_ref[0, split * PAGES_PER_TILE + j]
        rows = pl.ds(j * PAGE, PAGE)
        plgpu.copy_gmem_to_smem(k_ref.at[kv_head, page], k_smem.at[rows], tma_barriers.at[2 * j])
        plgpu.copy_gmem_to_smem(v_ref.at[kv_head, page], v_smem.at[rows],
                                tma_barriers.at[2 * j + 1])
      for j in range(2 * PAGES_PER_TILE):
        plgpu.barrier_wait(tma_barriers.at[j])
    if barrier:
      plgpu.barrier_arrive(merge_barrier)

      @pl.when(split == 0)
      def _():
        plgpu.barrier_wait(merge_barrier)

    @pl.when(split == 0)
    def _():
      out_ref[kv_head] = jnp.float32(1.0) + (
          k_smem[0, 0].astype(jnp.float32) if tma else 0.0)

  scratch = [plgpu.SMEM((64, D), jnp.bfloat16), plgpu.SMEM((64, D), jnp.bfloat16),
             plgpu.Barrier(num_barriers=2 * PAGES_PER_TILE)]
  scratch.append(plgpu.ClusterBarrier(collective_axes=("split",), leader_tracked=True)
                 if barrier else plgpu.Barrier())
  if smem_kib:  # Shared memory asked for but not used: what the block's size costs.
    scratch.append(plgpu.SMEM((smem_kib * 256,), jnp.float32))
  extra = dict(cluster=(SPLITS,), cluster_names=("split",)) if cluster else {}
  return jax.jit(plgpu.kernel(
      kernel, out_type=jax.ShapeDtypeStruct((KV_HEADS,), jnp.float32),
      grid=(1, KV_HEADS), grid_names=("seq", "kv_head"), scratch_types=scratch,
      compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane),
      kernel_name="probe", **extra))


def triton_probe():
  """A Pallas Triton kernel at the Triton decode kernel's grid, doing nothing but one
  store per (kv head, split)."""

  def kernel(table_ref, out_ref):
    out_ref[0, 0] = table_ref[0, 0].astype(jnp.float32)

  return jax.jit(pl.pallas_call(
      kernel, out_shape=jax.ShapeDtypeStruct((KV_HEADS, SPLITS), jnp.float32),
      grid=(KV_HEADS, SPLITS),
      in_specs=[pl.BlockSpec((1, CONTEXT // PAGE), lambda h, s: (0, 0))],
      out_specs=pl.BlockSpec((1, 1), lambda h, s: (h, s)),
      compiler_params=pltriton.CompilerParams(num_warps=4), name="probe_triton"))


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--calls", type=int, default=200)
  args = parser.parse_args(argv)
  if jax.default_backend() != "gpu":
    sys.exit("mgpu_launch_probe.py profiles GPU kernels: run it on the GPU")
  pool = 64 * CONTEXT // PAGE
  rng = np.random.default_rng(0)
  tables = [jnp.asarray(rng.permutation(pool)[: CONTEXT // PAGE].reshape(1, -1), jnp.int32)
            for _ in range(16)]
  cache = (KV_HEADS, pool, PAGE, D)
  k_cache = jax.random.normal(jax.random.key(1), cache, jnp.bfloat16)
  v_cache = jax.random.normal(jax.random.key(2), cache, jnp.bfloat16)
  q = jax.random.normal(jax.random.key(3), (1, 4 * KV_HEADS, D), jnp.bfloat16)
  lens = jnp.asarray([CONTEXT], jnp.int32)
  scale = D ** -0.5
  variants = {}
  for name, kw in [("mosaic empty, no cluster", dict(cluster=False, barrier=False, tma=False)),
                   ("mosaic empty, no cluster, 112 KiB more shared memory",
                    dict(cluster=False, barrier=False, tma=False, smem_kib=112)),
                   ("mosaic empty, cluster 8", dict(cluster=True, barrier=False, tma=False)),
                   ("mosaic cluster 8 + cluster barrier", dict(cluster=True, barrier=True, tma=False)),
                   ("mosaic page ids + 8 TMA pages, no cluster", dict(cluster=False, barrier=False, tma=True)),
                   ("mosaic page ids + 8 TMA pages, cluster 8", dict(cluster=True, barrier=False, tma=True)),
                   ("mosaic page ids + 8 TMA pages + barrier, cluster 8", dict(cluster=True, barrier=True, tma=True))]:
    fn = mosaic_probe(**kw)
    variants[name] = lambda t, f=fn: f(t, k_cache, v_cache)
  tri = triton_probe()
  variants["triton empty, grid 8 x 8"] = tri
  ours = functools.partial(paged_decode_attention, scale=scale, config=decode_config(1, CONTEXT, D))
  variants["jllm_decode (Triton), tickets zeroed per call"] = lambda t: ours(q, k_cache, v_cache, lens, t)
  for splits in (8, 4):
    fn = functools.partial(paged_decode_attention_mgpu, scale=scale, num_splits=splits)
    variants[f"jllm_decode_mgpu num_splits={splits}"] = lambda t, f=fn: f(q, k_cache, v_cache, lens, t)
  rows = []
  for label, call in variants.items():
    try:
      events = events_per_call(call, tables, args.calls)
    except Exception as e:  # A probe that fails to build is reported, not fatal.
      rows.append((label, f"failed: {type(e).__name__}: {str(e)[:120]}"))
      continue
    total = sum(len(d) / args.calls * statistics.median(d) / 1e3 for d in events.values())
    detail = ", ".join(f"{n[:40]} {statistics.median(d) / 1e3:.2f}" for n, d in events.items())
    rows.append((label, f"{total:.2f} ({detail})"))
  print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}; one call per program, "
        f"median device us over {args.calls} calls")
  print("| probe | device us (events) |\n|---|---|")
  for label, value in rows:
    print(f"| {label} | {value} |")


if __name__ == "__main__":
  main()
