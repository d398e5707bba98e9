"""Paged decode attention on Mosaic GPU (Hopper): kv splits merged inside a cluster.

The Triton kernel (`paged_decode_attention`) merges its kv splits through global
memory: each split stores its softmax state, takes a release/acquire ticket, and the
last one reads the others' states back from L2. At batch 1 x 512 that chain of
dependent L2 round trips is about a fifth of the call (BUILD_NOTES.md, sessions 6-7).
Pallas' Triton backend cannot do better: it has no thread-block clusters. (The d64
1 x 512 gap to 1.2x of JAX's kernel that this kernel was built for closed in the Triton
kernel instead, by loading q and the page ids ahead of the length; session 10.)

Here the `num_splits` splits of one (sequence, kv head) run as the blocks of one
cluster. Split s takes the sequence's 64-key tiles s, s + num_splits, ... (a short
sequence in a wide page table still spreads over every split), TMA-loads each tile's
pages by the page ids it reads from the block table, and runs QK and PV on wgmma with
the GQA group's query rows at the top of a 64-row tile (wgmma's M; the rows below are
never written out). Each split but the leader then pushes its state (output
normalised by its own sum, in the input dtype; running max and sum in f32) into the
leader block's shared memory and arrives on the leader's cluster barrier; the leader
merges them with its own state, still in registers, and writes the group's rows. No
global workspace, no atomics, no tickets. (`merge="global"` puts the states in
global-memory slots instead, which the leader reads back after the same barrier: a
fallback timed beside it.)

Status: correct on the device (an H200, `scripts/stress_decode.py --kernel mgpu`) but
slower than the Triton kernel where it was meant to win: 5.7 against 4.5 us at d64
1 x 512, one call per program (BUILD_NOTES.md, session 9), and on an H100 in session 10,
with the refill's page ids ahead of the tile's wait and a read-only wait on the output
copy, 5.6 against the Triton kernel's 4.1-4.2 us of chained kernel time. Its fixed cost
is not the cluster: an empty Mosaic kernel at its launch shape took 0.99 us, 1.15 with
a cluster of 8 and its barrier, 1.76 with the page ids and a tile's TMA besides
(`scripts/mgpu_launch_probe.py`). The engine runs it only for
a decode step whose `DecodeConfig` sets `mgpu_splits`, which no cell of the table does;
`scripts/bench_kernels.py` times it beside the Triton kernel.

Limits (`check_mgpu_decode_args` says which was hit): 16-bit dtypes (wgmma), head_dim a
multiple of 64 (128-byte swizzle), pages of 8-64 tokens dividing 64, at most 64 query
heads per kv head, 1-8 splits (the portable cluster size), and shared memory for two
K/V tiles plus every split's state in the leader.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax._src.lib.mlir import ir
from jax._src.lib.mlir.dialects import arith as arith_dialect
from jax._src.lib.mlir.dialects import gpu as gpu_dialect
from jax.experimental import pallas as pl
from jax.experimental.mosaic.gpu import utils as mgpu_utils
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.paged_decode_attention import (
    MASK_VALUE,
    log2_logits,
    paged_decode_attention_reference,
)

TILE = 64  # Keys per wgmma step, and the rows of the query tile (wgmma's M).
NUM_SLOTS = 2  # K/V tiles in flight per split: the next tile loads during this one.
MAX_SPLITS = 8  # The portable cluster size.
# Where the splits' states meet: the leader's shared memory (DSMEM), or global-memory
# slots the leader reads back (still no atomics: the cluster barrier orders them). The
# second is the first's fallback, timed beside it, should the push not pay.
MERGES = ("dsmem", "global")
# Dynamic shared memory per block on the H100 (227 KiB), as Mosaic checks it.
SMEM_LIMIT_BYTES = 232448
_SWIZZLE = 128  # Bytes: 64 16-bit elements, the minor tile of every wgmma operand.
# Padding of each row of a split's output state. In the WGMMA layouts the 8 rows of a
# warp's quad-lanes sit at the same columns: on rows a multiple of 128 bytes apart they
# would hit the same banks (an 8-way conflict on every store and load of the merge).
# 16 bytes more per row moves each row 4 banks on, and the 32 lanes hit 32 banks.
_ROW_PAD = 8

# The reference is the Triton kernel's: both compute the same function.
paged_decode_attention_mgpu_reference = paged_decode_attention_reference


def _query_rows(group: int) -> int:
  """Query rows copied per (sequence, kv head): the group, padded to the tiling's 8."""
  return -(-group // 8) * 8


def _state_slots(num_splits: int) -> int:
  """The leader's slots for the other splits' states (it keeps its own in registers);
  one even without other splits, as a buffer cannot be empty."""
  return max(num_splits - 1, 1)


def smem_bytes(head_dim: int, num_splits: int) -> int:
  """Shared memory one block asks for (the leader's, with the other splits' states);
  the query tile is 64 rows whatever the group."""
  tile = TILE * head_dim * 2
  return (tile  # query tile
          + 2 * NUM_SLOTS * tile  # K and V slots
          + _state_slots(num_splits) * TILE * (head_dim + _ROW_PAD) * 2  # their outputs
          + 2 * _state_slots(num_splits) * TILE * 4  # their running max and sum
          + tile  # the merged output, staged for its copy out
          # Barriers and alignment: Mosaic's count ran 2.2-2.7 KB over the buffers'
          # sum at d192-256 (tests/test_decode_mgpu.py checks the bound).
          + 4096)


def check_mgpu_decode_args(q_shape, q_dtype, cache_shape, num_splits: int) -> None:
  """Raises ValueError naming the first argument this kernel cannot take."""
  _, num_q_heads, head_dim = q_shape
  num_kv_heads, _, block_size, cache_head_dim = cache_shape
  if jnp.dtype(q_dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    raise ValueError(f"dtype must be bfloat16 or float16 (wgmma), got {jnp.dtype(q_dtype)}")
  if cache_head_dim != head_dim or head_dim % 64:
    raise ValueError(f"head_dim must be a multiple of 64 and match the cache's, got "
                     f"q {head_dim}, cache {cache_head_dim}")
  if block_size % 8 or TILE % block_size:
    raise ValueError(f"block_size must be 8, 16, 32 or 64, got {block_size}")
  if num_q_heads % num_kv_heads or num_q_heads // num_kv_heads > TILE:
    raise ValueError(f"num_q_heads ({num_q_heads}) must be a multiple of num_kv_heads "
                     f"({num_kv_heads}), at most {TILE} per kv head")
  if not 1 <= num_splits <= MAX_SPLITS:
    raise ValueError(f"num_splits must be in [1, {MAX_SPLITS}], got {num_splits}")
  need = smem_bytes(head_dim, num_splits)
  if need > SMEM_LIMIT_BYTES:
    raise ValueError(f"num_splits={num_splits} at head_dim={head_dim} needs {need} bytes of "
                     f"shared memory, more than the {SMEM_LIMIT_BYTES} a block may have")


def mgpu_decode_supported(q_shape, q_dtype, cache_shape, num_splits: int) -> bool:
  """Whether `paged_decode_attention_mgpu` can take these arguments."""
  try:
    check_mgpu_decode_args(q_shape, q_dtype, cache_shape, num_splits)
  except ValueError:
    return False
  return True


@plgpu.inline_mgpu()
def _fence_cluster(ctx):
  """Orders this thread's shared-memory accesses at cluster scope, then syncs the
  warpgroup. Before the push's arrival: the remote arrive is CTA-scoped and made by
  one thread, so every thread's stores into the leader must be performed first. After
  the leader's wait: its loads must see them."""
  del ctx
  mgpu_utils.inline_ptx("fence.acq_rel.cluster;", has_side_effects=True)
  mgpu_utils.warpgroup_barrier()


def _store_rows(x, ref, layout, *, rows: int, to_leader: bool = False):
  """Stores the top `rows` rows of `x` (whole warps' rows: the rows below are never read
  out) into `ref`, or, `to_leader`, into `ref`'s copy in the leader block (block 0 of
  the cluster axis).

  Through Mosaic GPU directly: Pallas' own store to a cluster ref fails (Warpgroup
  lowering rejects its memory space; Lane lowering finds no bank-conflict-free transfer
  plan for these layouts), and to GMEM or a padded ref it wants a plan these stores do
  not need."""
  # In both WGMMA layouts warp w holds rows 16w..16w+15. Only the warps holding the
  # group's rows store: at a GQA group of 4 that is a quarter of the bytes, which all
  # splits send at once into the one leader.
  warps = -(-rows // 16)

  @plgpu.inline_mgpu(arg_types=(layout, plgpu.RefType()))
  def store(ctx, x, ref):
    del ctx
    if to_leader:
      ref = mgpu_utils.get_cluster_ref(
          ref, gpu_dialect.Dimension.x, mgpu_utils.c(0, ir.IndexType.get()), generic=False)
    i32 = ir.IntegerType.get_signless(32)
    with mgpu_utils.when(arith_dialect.cmpi(arith_dialect.CmpIPredicate.ult,
                                            mgpu_utils.warp_idx(sync=True),
                                            mgpu_utils.c(warps, i32))):
      x.store_untiled(ref, optimized=False)

  store(x, ref)


def _decode_kernel(seq_lens_ref, block_tables_ref, q_ref, k_ref, v_ref, out_ref, *refs,
                   num_q_heads: int, group: int, scale: float, soft_cap: float | None,
                   sliding_window: int | None, num_splits: int, merge: str, interpret: bool):
  # q_ref: [S * num_q_heads, D]; k_ref, v_ref: [KVH, num_blocks, block_size, D];
  # out_ref: [S, KVH, group, D]. One block per (sequence, kv head, split).
  seq, kv_head, split = lax.axis_index("seq"), lax.axis_index("kv_head"), lax.axis_index("split")
  through_global = interpret or merge == "global"
  if through_global:  # The splits' states go through global-memory slots (extra outputs).
    o_slots, m_slots, l_slots, *refs = refs
  (q_smem, k_smem, v_smem, o_state, m_state, l_state, staging, kv_barriers, q_barrier,
   merge_barrier) = refs
  head_dim = q_smem.shape[1]
  block_size = k_ref.shape[2]
  max_blocks = block_tables_ref.shape[1]
  pages_per_tile = TILE // block_size

  def state_slots(j):
    """Where split j's (o, m, l) wait for the leader's merge (j >= 1: the leader keeps
    its own in registers)."""
    if through_global:
      at = (seq, kv_head, j - 1)
      return o_slots.at[at], m_slots.at[at], l_slots.at[at]
    return o_state.at[j - 1, :, pl.ds(0, head_dim)], m_state.at[j - 1], l_state.at[j - 1]

  seq_len = seq_lens_ref[seq]
  kv_lo = 0 if sliding_window is None else jnp.maximum(seq_len - sliding_window, 0)
  first_tile = kv_lo // TILE
  num_steps = jnp.maximum(pl.cdiv(pl.cdiv(seq_len, TILE) - first_tile - split, num_splits), 0)

  def tile_of(step):
    return first_tile + split + step * num_splits

  def tile_pages(step):
    # Scalar loads from the table. A tile's pages past the table's width (a table not a
    # whole number of tiles wide) read its last entry: their keys are past the length,
    # masked, but their V rows meet p = 0 in the PV matmul, and stale shared memory
    # could hold NaN bits there. Clamped, the loads are always in bounds, so they need
    # not wait for the length.
    return [block_tables_ref[seq, jnp.minimum(tile_of(step) * pages_per_tile + j, max_blocks - 1)]
            for j in range(pages_per_tile)]

  def load_tile(pages, slot):
    for j, page in enumerate(pages):
      rows = pl.ds(j * block_size, block_size)
      plgpu.copy_gmem_to_smem(k_ref.at[kv_head, page], k_smem.at[slot, rows],
                              kv_barriers.at[2 * (slot * pages_per_tile + j)])
      plgpu.copy_gmem_to_smem(v_ref.at[kv_head, page], v_smem.at[slot, rows],
                              kv_barriers.at[2 * (slot * pages_per_tile + j) + 1])

  def wait_tile(slot, which):
    for j in range(pages_per_tile):
      plgpu.barrier_wait(kv_barriers.at[2 * (slot * pages_per_tile + j) + which])

  # The group's query rows on top of the tile, the rows below them left unset: wgmma
  # rows are independent and only the group's are written out. Rows past q's end (the
  # last group, padded to 8) come in as zeros.
  q_rows = _query_rows(group)
  plgpu.copy_gmem_to_smem(q_ref.at[pl.ds(seq * num_q_heads + kv_head * group, q_rows)],
                          q_smem.at[pl.ds(0, q_rows)], q_barrier,
                          oob_mode=plgpu.OOBFillMode.ZEROS)
  # The first tiles' page ids go out beside the length's load (without a window they
  # do not depend on it); only their copies wait for it.
  first_pages = [tile_pages(step) for step in range(NUM_SLOTS)]
  for step in range(NUM_SLOTS):
    pl.when(step < num_steps)(functools.partial(load_tile, first_pages[step], step))
  plgpu.barrier_wait(q_barrier)

  row_layout = plgpu.Layout.WGMMA.reduce(1)
  o = plgpu.layout_cast(jnp.zeros((TILE, head_dim), jnp.float32), plgpu.Layout.WGMMA)
  m = plgpu.layout_cast(jnp.full((TILE,), -jnp.inf, jnp.float32), row_layout)
  l = plgpu.layout_cast(jnp.zeros((TILE,), jnp.float32), row_layout)

  def step_fn(step, carry):
    o, m, l = carry
    slot = lax.rem(step, NUM_SLOTS)
    # The refill's page ids, read before this tile's wait (clamped, so always in
    # bounds): their global round trip runs under this step, where read at the refill
    # it would come before the refill's TMA, one more round trip per tile.
    refill_pages = tile_pages(step + NUM_SLOTS)
    wait_tile(slot, 0)
    if interpret:  # The interpreter has no wgmma.
      qk = lax.dot_general(q_smem[...], k_smem.at[slot][...], (((1,), (1,)), ((), ())),
                           preferred_element_type=jnp.float32)
    else:
      def qk_fn(acc_ref):
        plgpu.wgmma(acc_ref, q_smem, k_smem.at[slot].transpose((1, 0)))
        return acc_ref[...]
      qk = pl.run_scoped(qk_fn, plgpu.ACC((TILE, TILE), jnp.float32))
    keys = tile_of(step) * TILE + plgpu.broadcasted_iota(
        jnp.int32, (TILE, TILE), 1, layout=plgpu.Layout.WGMMA)
    # Every tile a split runs holds a visible key, so each row's max is finite.
    s = jnp.where((keys >= kv_lo) & (keys < seq_len), log2_logits(qk, scale, soft_cap),
                  MASK_VALUE)
    m_next = jnp.maximum(m, s.max(axis=1))
    correction = jnp.exp2(m - m_next)
    p = jnp.exp2(s - lax.broadcast_in_dim(m_next, s.shape, [0]))
    l_next = l * correction + p.sum(axis=1)
    o = o * lax.broadcast_in_dim(correction, o.shape, [0])
    wait_tile(slot, 1)
    p16 = p.astype(v_smem.dtype)
    if interpret:
      o = o + jnp.dot(p16, v_smem.at[slot][...], preferred_element_type=jnp.float32)
    else:
      def pv_fn(acc_ref):
        plgpu.wgmma(acc_ref, p16, v_smem.at[slot])
      o = pl.run_state(pv_fn)(plgpu.ACC.init(o))
    # Reading the accumulator waited for both wgmmas, so the slot is free to refill.
    @pl.when(step + NUM_SLOTS < num_steps)
    def _refill():
      load_tile(refill_pages, slot)
    return o, m_next, l_next

  o, m, l = lax.fori_loop(0, num_steps, step_fn, (o, m, l))

  # The push: o normalised by this split's own sum and in the input dtype (at d128 and
  # 8 splits f32 states would not fit the leader's shared memory; the output is
  # rounded to that dtype anyway); an idle split pushes o = 0, m = -inf, l = 0. The
  # leader's own state stays in its registers.
  o = o / lax.broadcast_in_dim(jnp.where(l == 0, 1.0, l), o.shape, [0])

  @pl.when(split != 0)
  def _push():
    o_slot, m_slot, l_slot = state_slots(split)
    if interpret:  # No inline Mosaic GPU, no DSMEM: the slots are global.
      o_slot[...], m_slot[...], l_slot[...] = o.astype(o_slot.dtype), m, l
      return
    push = functools.partial(_store_rows, rows=group, to_leader=not through_global)
    push(o.astype(o_slot.dtype), o_slot, plgpu.Layout.WGMMA)
    push(m, m_slot, row_layout)
    push(l, l_slot, row_layout)
    _fence_cluster()

  plgpu.barrier_arrive(merge_barrier)

  @pl.when(split == 0)
  def _merge():
    plgpu.barrier_wait(merge_barrier)
    if not interpret:
      _fence_cluster()
    slots = [state_slots(j) for j in range(1, num_splits)]
    ms = [m] + [plgpu.load(m_slot, layout=row_layout, optimized=False) for _, m_slot, _ in slots]
    ls = [l] + [plgpu.load(l_slot, layout=row_layout, optimized=False) for _, _, l_slot in slots]
    m_max = functools.reduce(jnp.maximum, ms)
    # A row no split touched (a padding row) keeps m = -inf: weights 0, not NaN.
    m_max = jnp.where(m_max == -jnp.inf, 0.0, m_max)
    weights = [jnp.exp2(mj - m_max) * lj for mj, lj in zip(ms, ls)]
    total = functools.reduce(lambda a, b: a + b, weights)
    outs = [o] + [plgpu.load(o_slot, layout=plgpu.Layout.WGMMA, optimized=False).astype(jnp.float32)
                for o_slot, _, _ in slots]
    acc = functools.reduce(lambda a, b: a + b, [
        oj * lax.broadcast_in_dim(w, oj.shape, [0]) for oj, w in zip(outs, weights)])
    acc = (acc / lax.broadcast_in_dim(jnp.where(total == 0, 1.0, total), acc.shape, [0])
           ).astype(staging.dtype)
    # Out through a dense staging tile (TMA reads a dense box); only the warps holding
    # the group's rows write it.
    if interpret:
      staging[...] = acc
    else:
      _store_rows(acc, staging, plgpu.Layout.WGMMA, rows=group)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(staging.at[pl.ds(0, group)], out_ref.at[seq, kv_head])
    # Only the read of the staging tile must be done before the block exits; the write
    # to global memory completes on its own (as CUTLASS's epilogue waits).
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


@functools.partial(
    jax.jit,
    static_argnames=("scale", "soft_cap", "sliding_window", "num_splits", "merge", "interpret"))
def paged_decode_attention_mgpu(
    q: jax.Array,  # [S, num_q_heads, head_dim]
    k_cache: jax.Array,  # [num_kv_heads, num_blocks, block_size, head_dim]
    v_cache: jax.Array,
    seq_lens: jax.Array,  # [S] int32, 0 for padding rows
    block_tables: jax.Array,  # [S, max_blocks_per_seq] int32
    *,
    scale: float,
    soft_cap: float | None = None,
    sliding_window: int | None = None,
    num_splits: int = 4,
    merge: str = "dsmem",
    interpret: bool = False,
) -> jax.Array:
  """`paged_decode_attention`'s function, one cluster of `num_splits` blocks per
  (sequence, kv head). Returns [S, num_q_heads, head_dim] in q's dtype; rows with
  seq_len 0 are zeros. `merge` is where the splits' states meet (MERGES). `interpret`
  runs it in the Mosaic GPU interpreter (CPU), with jnp matmuls for wgmma and the
  global-memory slots whatever `merge` says."""
  check_mgpu_decode_args(q.shape, q.dtype, k_cache.shape, num_splits)
  num_seqs, num_q_heads, head_dim = q.shape
  num_kv_heads = k_cache.shape[0]
  group = num_q_heads // num_kv_heads
  swizzled = dict(transforms=(plgpu.TilingTransform((8, _SWIZZLE // 2)),
                              plgpu.SwizzleTransform(_SWIZZLE)))
  dtype = q.dtype
  pages_per_tile = TILE // k_cache.shape[2]
  slots = _state_slots(num_splits)
  scratch = [
      plgpu.SMEM((TILE, head_dim), dtype, **swizzled),
      plgpu.SMEM((NUM_SLOTS, TILE, head_dim), dtype, **swizzled),
      plgpu.SMEM((NUM_SLOTS, TILE, head_dim), dtype, **swizzled),
      plgpu.SMEM((slots, TILE, head_dim + _ROW_PAD), dtype),
      plgpu.SMEM((slots, TILE), jnp.float32),
      plgpu.SMEM((slots, TILE), jnp.float32),
      plgpu.SMEM((TILE, head_dim), dtype),
      plgpu.Barrier(num_barriers=2 * NUM_SLOTS * pages_per_tile),
      plgpu.Barrier(),
      # Leader-tracked: only the leader counts the arrivals, so the other blocks may
      # exit after theirs. The interpreter lacks that mode (and models no exits): there
      # every block takes every arrival.
      plgpu.ClusterBarrier(collective_axes=("split",), leader_tracked=not interpret),
  ]
  if merge not in MERGES:
    raise ValueError(f"merge must be one of {MERGES}, got {merge!r}")
  out_type = [jax.ShapeDtypeStruct((num_seqs, num_kv_heads, group, head_dim), dtype)]
  if interpret or merge == "global":
    state = (num_seqs, num_kv_heads, slots, TILE)
    out_type += [jax.ShapeDtypeStruct((*state, head_dim), dtype),
                 jax.ShapeDtypeStruct(state, jnp.float32),
                 jax.ShapeDtypeStruct(state, jnp.float32)]
  kernel = functools.partial(
      _decode_kernel, num_q_heads=num_q_heads, group=group, scale=scale,
      soft_cap=soft_cap, sliding_window=sliding_window, num_splits=num_splits,
      merge=merge, interpret=interpret)
  out, *_ = plgpu.kernel(
      kernel,
      out_type=out_type,
      grid=(num_seqs, num_kv_heads),
      grid_names=("seq", "kv_head"),
      cluster=(num_splits,),
      cluster_names=("split",),
      scratch_types=scratch,
      compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane),
      interpret=plgpu.InterpretGPUParams(inline_mgpu="ignore") if interpret else None,
      kernel_name="jllm_paged_decode_attention_mgpu",
  )(seq_lens, block_tables, q.reshape(num_seqs * num_q_heads, head_dim), k_cache, v_cache)
  return out.reshape(q.shape)
