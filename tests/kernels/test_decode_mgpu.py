"""The Mosaic GPU decode kernel on CPU: the Mosaic GPU interpreter against the reference
(the algorithm: pages, masks, splits, the merge), and the lowering for the H100 (sm_90a
layouts, shared memory, the cluster's DSMEM merge), which needs no GPU.

The interpreter runs every part of the kernel but two, which it cannot model: the
wgmma matmuls (it computes them with jnp) and the pushes into the leader's shared memory
(it passes the states through global-memory slots). Those two are what the lowering test
pins down instead.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import paged_decode_attention_reference
from pallas_kernels import paged_decode_attention_mgpu as mgpu
from pallas_kernels.paged_decode_attention_mgpu import (
    check_mgpu_decode_args,
    paged_decode_attention_mgpu,
)
from test_kernels import _lower_for_h100, assert_close, decode_batch, decode_inputs

# (group, head_dim, block_size, num_splits, sliding_window, soft_cap, dtype)
MGPU_CASES = [
    (1, 64, 16, 2, None, None, jnp.bfloat16),
    (3, 128, 32, 3, 50, None, jnp.bfloat16),
    (4, 64, 16, 4, None, 10.0, jnp.float16),
    (8, 128, 16, 8, 40, 10.0, jnp.bfloat16),  # more splits than most rows' tiles
    (4, 64, 32, 1, None, None, jnp.bfloat16),  # one split: the leader merges itself
]


@pytest.mark.parametrize(
    "group,head_dim,block_size,num_splits,sliding_window,soft_cap,dtype", MGPU_CASES)
def test_mgpu_decode_matches_reference(rng, group, head_dim, block_size, num_splits,
                                       sliding_window, soft_cap, dtype):
  # Lengths 1, page-1, page, page+1, a tile and one, long (several tiles per split, so
  # the two K/V slots refill), and padding rows of length 0. The table is one page wider
  # than the longest row, so at page 16 it is not a whole number of 64-key tiles wide.
  lens = [1, block_size - 1, 0, block_size, block_size + 1, 65, 9 * 64 + 3, 0]
  batch = decode_batch(rng, lens, group=group, head_dim=head_dim, block_size=block_size,
                       dtype=dtype)
  kw = dict(scale=head_dim**-0.5, soft_cap=soft_cap, sliding_window=sliding_window)
  got = paged_decode_attention_mgpu(*decode_inputs(batch), num_splits=num_splits,
                                    interpret=True, **kw)
  want = paged_decode_attention_reference(*decode_inputs(batch), **kw)
  assert got.dtype == dtype and got.shape == batch.q.shape
  assert_close(got, want, jnp.bfloat16)
  np.testing.assert_array_equal(np.asarray(got)[[2, 7]], 0)


def _h100_lowering(head_dim, block_size, num_splits, **kw):
  spec = jax.ShapeDtypeStruct
  cache = spec((8, 4096, block_size, head_dim), jnp.bfloat16)
  fn = functools.partial(paged_decode_attention_mgpu, scale=0.1, num_splits=num_splits, **kw)
  return _lower_for_h100(fn, spec((64, 32, head_dim), jnp.bfloat16), cache, cache,
                         spec((64,), jnp.int32), spec((64, 256), jnp.int32)).as_text()


@pytest.mark.parametrize("head_dim,block_size,num_splits,window,soft_cap", [
    (64, 16, 4, None, None), (64, 32, 8, 512, 30.0), (128, 16, 8, None, None),
    (128, 32, 2, 512, 30.0), (128, 16, 1, None, None)])
def test_mgpu_decode_lowers_for_h100(head_dim, block_size, num_splits, window, soft_cap):
  """Mosaic lowers the kernel to NVVM for sm_90a here (layouts, shared memory within
  the block's limit), leaving PTX and the run to the GPU machine."""
  text = _h100_lowering(head_dim, block_size, num_splits, sliding_window=window,
                        soft_cap=soft_cap)
  assert text.count("stablehlo.custom_call @mosaic_gpu") == 1
  assert "stablehlo.reduce" not in text  # the splits merge inside the kernel
  assert f"wgmma.mma_async.sync.aligned.m64n{head_dim}k16.f32.bf16.bf16" in text  # PV
  assert "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16" in text  # QK
  # The merge: pushes through the cluster's shared memory, fenced at cluster scope,
  # counted on the leader's barrier (by a remote arrive, from a cluster of two or more).
  assert "nvvm.mapa" in text and "fence.acq_rel.cluster;" in text
  assert ("mbarrier.arrive.shared::cluster" in text) == (num_splits > 1)
  assert ("barrier.cluster.wait" in text) == (num_splits > 1)  # after the barriers' init


def test_mgpu_decode_can_merge_through_global_memory_instead():
  """The fallback merge: the states go to global-memory slots (plain stores, fenced at
  cluster scope), and the leader reads them back after the same cluster barrier."""
  text = _h100_lowering(128, 16, 4, merge="global")
  assert text.count("stablehlo.custom_call @mosaic_gpu") == 1
  assert "nvvm.mapa" not in text  # no pointer into another block's shared memory
  assert "fence.acq_rel.cluster;" in text and "mbarrier.arrive.shared::cluster" in text
  with pytest.raises(ValueError, match="merge must be one of"):
    _h100_lowering(128, 16, 4, merge="l2")


@pytest.mark.parametrize("head_dim,num_splits", [(256, 2), (192, 4), (192, 5), (128, 8)])
def test_mgpu_smem_estimate_bounds_what_mosaic_allocates(monkeypatch, head_dim, num_splits):
  """Where `smem_bytes` says the kernel fits, Mosaic lowers it; where Mosaic's own
  count goes over the block's limit, `smem_bytes` said so first."""
  fits = mgpu.smem_bytes(head_dim, num_splits) <= mgpu.SMEM_LIMIT_BYTES
  monkeypatch.setattr(mgpu, "check_mgpu_decode_args", lambda *a, **k: None)
  spec = jax.ShapeDtypeStruct
  cache = spec((8, 64, 16, head_dim), jnp.bfloat16)
  fn = functools.partial(mgpu.paged_decode_attention_mgpu.__wrapped__, scale=0.1,
                         num_splits=num_splits)
  try:
    _lower_for_h100(fn, spec((4, 32, head_dim), jnp.bfloat16), cache, cache,
                    spec((4,), jnp.int32), spec((4, 16), jnp.int32))
    lowered = True
  except ValueError as e:
    assert "exceeds available shared memory" in str(e)
    lowered = False
  assert not fits or lowered
  assert (head_dim, num_splits, fits) in {(256, 2, False), (192, 4, True), (192, 5, False),
                                          (128, 8, True)}


@pytest.mark.parametrize("change,message", [
    (dict(dtype=jnp.float32), "dtype must be bfloat16 or float16"),
    (dict(head_dim=96), "head_dim must be a multiple of 64"),
    (dict(block_size=12), "block_size must be 8, 16, 32 or 64"),
    (dict(num_q_heads=12), r"num_q_heads \(12\) must be a multiple of num_kv_heads \(8\)"),
    (dict(num_splits=9), r"num_splits must be in \[1, 8\], got 9"),
    (dict(num_splits=0), r"num_splits must be in \[1, 8\], got 0"),
    (dict(head_dim=256, num_splits=4), "needs .* bytes of shared memory"),
])
def test_mgpu_decode_rejects_what_it_cannot_run(change, message):
  args = dict(dtype=jnp.bfloat16, head_dim=128, block_size=16, num_q_heads=32, num_splits=4)
  args.update(change)
  q_shape = (2, args["num_q_heads"], args["head_dim"])
  cache_shape = (8, 64, args["block_size"], args["head_dim"])
  with pytest.raises(ValueError, match=message):
    check_mgpu_decode_args(q_shape, args["dtype"], cache_shape, args["num_splits"])
  # The launcher checks before it traces anything.
  q = jnp.zeros(q_shape, args["dtype"])
  cache = jnp.zeros(cache_shape, args["dtype"])
  with pytest.raises(ValueError, match=message):
    paged_decode_attention_mgpu(q, cache, cache, jnp.ones((2,), jnp.int32),
                                jnp.zeros((2, 4), jnp.int32), scale=0.1,
                                num_splits=args["num_splits"], interpret=True)


@pytest.mark.parametrize("dtype,head_dim,takes_mgpu", [
    (jnp.bfloat16, 64, True),
    (jnp.float32, 64, False),  # wgmma wants 16-bit operands: the Triton kernel runs
    (jnp.bfloat16, 32, False),  # nor can it tile a head_dim of 32
])
def test_a_decode_step_runs_the_mgpu_kernel_where_its_config_asks_and_it_can(
    rng, monkeypatch, dtype, head_dim, takes_mgpu):
  """The engine's attention (write the step's K/V, then attend) with a DecodeConfig
  that sets mgpu_splits: the Mosaic GPU kernel takes the step where it can, the Triton
  kernel where it cannot, and both give the reference backend's output."""
  from jllm.layers import attention
  from jllm.layers.attention import AttentionBackend, KVCache, paged_attention
  from pallas_kernels import DecodeConfig, new_decode_tickets

  calls = []
  for name in ("paged_decode_attention", "paged_decode_attention_mgpu"):
    real = getattr(attention, name)
    monkeypatch.setattr(attention, name,
                        lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
  # Padding rows last, as the engine lays out a decode step: token i is sequence i's.
  batch = decode_batch(rng, [70, 1, 17, 0], group=2, head_dim=head_dim, block_size=16, dtype=dtype)
  md = dataclasses.replace(batch.md, decode_only=True,
                           decode_config=DecodeConfig(2, 16, mgpu_splits=2))
  num_kv_heads = batch.k_cache.shape[0]
  new = lambda: jnp.asarray(rng.standard_normal((4, num_kv_heads, head_dim)), dtype)  # noqa: E731
  k, v = new(), new()

  def run(backend):
    cache = KVCache(batch.k_cache, batch.v_cache, new_decode_tickets(num_kv_heads, 4))
    out, cache = paged_attention(batch.q, k, v, cache, md, scale=head_dim**-0.5, backend=backend)
    return out, cache

  want, _ = run(AttentionBackend.REFERENCE)
  calls.clear()
  got, cache = run(AttentionBackend.PALLAS)
  assert calls == ["paged_decode_attention_mgpu" if takes_mgpu else "paged_decode_attention"]
  assert_close(got, want, dtype)
  assert not np.asarray(got)[3].any()  # the padding row
  assert not np.asarray(cache.decode_tickets).any()


@pytest.mark.parametrize("kw", [
    dict(cluster=False, barrier=False, tma=False, smem_kib=112),
    dict(cluster=True, barrier=True, tma=False), dict(cluster=True, barrier=True, tma=True)])
def test_launch_probe_kernels_lower_for_h100(kw):
  """scripts/mgpu_launch_probe.py's minimal kernels lower for sm_90a, so a GPU run of it
  spends its time measuring, not failing to build."""
  from scripts import mgpu_launch_probe as probe
  spec = jax.ShapeDtypeStruct
  cache = spec((probe.KV_HEADS, 64, probe.PAGE, probe.D), jnp.bfloat16)
  table = spec((1, probe.CONTEXT // probe.PAGE), jnp.int32)
  text = _lower_for_h100(probe.mosaic_probe(**kw), table, cache, cache).as_text()
  assert text.count("stablehlo.custom_call @mosaic_gpu") == 1
  assert ("barrier.cluster.wait" in text) == kw["cluster"]
  assert _lower_for_h100(probe.triton_probe(), table).as_text().count("__gpu$xla.gpu.triton") == 1
