"""pallas_kernels on CPU: each kernel (Pallas interpret mode) against its plain-jnp
reference, and each reference against a dense float64 numpy attention.

Inputs are drawn fresh on every run. Each kernel case combines several features
(GQA ratio, head_dim, page size, lengths, window, soft-cap, dtype) to keep the slow
interpret mode to a handful of calls.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import os
import re
import subprocess
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jllm.layers.attention_metadata import AttentionMetadata
from pallas_kernels import (
    DecodeConfig,
    decode_config,
    new_decode_tickets,
    paged_decode_attention,
    paged_decode_attention_reference,
    ragged_paged_attention,
    ragged_paged_attention_reference,
    write_kv,
    write_kv_reference,
)
from pallas_kernels.tuning import DECODE_TABLES

pytestmark = pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated:DeprecationWarning")

NUM_KV_HEADS = 2
# Kernel vs reference. float32: only summation order differs. bfloat16: the kernel
# feeds bf16 probabilities to the PV matmul and both round the output to bf16.
TOLERANCE = {jnp.float32: dict(atol=2e-5, rtol=2e-5), jnp.bfloat16: dict(atol=1.5e-2, rtol=1e-2)}


@dataclasses.dataclass
class PagedBatch:
    md: AttentionMetadata
    q: jax.Array  # [T, num_q_heads, head_dim]
    k_cache: jax.Array
    v_cache: jax.Array
    token_to_seq: np.ndarray  # [T]: the sequence of each token (for the dense check)


def make_batch(
    rng, context_lens, query_lens, *, num_tokens, group, head_dim, block_size, dtype=jnp.float32
) -> PagedBatch:
    """A step of sequences with `context_lens[s]` tokens in the cache (this step's
    included), the last `query_lens[s]` of them queried. Rows with (0, 0) are padding.
    Pages are shuffled over a cache full of random values, page 0 included, so a
    stray read of an unused block-table entry (0) shows up."""
    num_seqs = len(context_lens)
    pages_per_seq = [-(-n // block_size) for n in context_lens]
    max_blocks = max(pages_per_seq) + 1
    num_blocks = sum(pages_per_seq) + 3
    pages = iter(rng.permutation(num_blocks))
    block_tables = np.zeros((num_seqs, max_blocks), np.int32)
    for s, n in enumerate(pages_per_seq):
        block_tables[s, :n] = [next(pages) for _ in range(n)]
    query_start_loc = np.concatenate([[0], np.cumsum(query_lens)]).astype(np.int32)
    assert query_start_loc[-1] <= num_tokens
    positions = np.zeros(num_tokens, np.int32)
    token_to_seq = np.zeros(num_tokens, np.int32)
    slot_mapping = np.full(num_tokens, -1, np.int32)
    for s in range(num_seqs):
        for i, t in enumerate(range(query_start_loc[s], query_start_loc[s + 1])):
            pos = context_lens[s] - query_lens[s] + i
            positions[t], token_to_seq[t] = pos, s
            slot_mapping[t] = block_tables[s, pos // block_size] * block_size + pos % block_size
    md = AttentionMetadata(
        positions=jnp.asarray(positions),
        slot_mapping=jnp.asarray(slot_mapping),
        block_tables=jnp.asarray(block_tables),
        seq_lens=jnp.asarray(context_lens, jnp.int32),
        query_start_loc=jnp.asarray(query_start_loc),
    )
    cache_shape = (NUM_KV_HEADS, num_blocks, block_size, head_dim)

    def normal(shape):
        return jnp.asarray(rng.standard_normal(shape), dtype)

    return PagedBatch(
        md, normal((num_tokens, NUM_KV_HEADS * group, head_dim)), normal(cache_shape), normal(cache_shape), token_to_seq
    )


def dense_attention_numpy(
    q,
    k_cache,
    v_cache,
    block_tables,
    seq_lens,
    token_to_seq,
    positions,
    is_query,
    *,
    scale,
    soft_cap=None,
    sliding_window=None,
):
    """Token by token, head by head, in float64 over each sequence's keys laid out
    contiguously by walking its block table."""
    q, k_cache, v_cache = (np.asarray(x, np.float64) for x in (q, k_cache, v_cache))
    block_tables, seq_lens = np.asarray(block_tables), np.asarray(seq_lens)
    num_kv_heads, _, block_size, _ = k_cache.shape
    group = q.shape[1] // num_kv_heads
    out = np.zeros_like(q)
    for t in range(q.shape[0]):
        if not is_query[t]:
            continue
        s, pos = int(token_to_seq[t]), int(positions[t])
        assert pos < seq_lens[s]
        first = 0 if sliding_window is None else max(0, pos - sliding_window + 1)
        keys = np.arange(first, pos + 1)
        pages, offsets = block_tables[s, keys // block_size], keys % block_size
        for h in range(q.shape[1]):
            kv_head = h // group
            scores = k_cache[kv_head, pages, offsets] @ q[t, h] * scale
            if soft_cap is not None:
                scores = soft_cap * np.tanh(scores / soft_cap)
            weights = np.exp(scores - scores.max())
            out[t, h] = weights @ v_cache[kv_head, pages, offsets] / weights.sum()
    return out


def decode_inputs(batch: PagedBatch):
    """A decode step's kernel arguments: one query row per sequence."""
    md = batch.md
    return (batch.q, batch.k_cache, batch.v_cache, md.seq_lens, md.block_tables)


def decode_batch(rng, seq_lens, **kw) -> PagedBatch:
    query_lens = [1 if n else 0 for n in seq_lens]
    return make_batch(rng, seq_lens, query_lens, num_tokens=len(seq_lens), **kw)


def assert_close(actual, expected, dtype):
    np.testing.assert_allclose(np.asarray(actual, np.float32), np.asarray(expected, np.float32), **TOLERANCE[dtype])


# ----------------------------------------------------------------- kv write


@pytest.mark.parametrize("head_dim,block_size", [(64, 16), (128, 32)])
def test_write_kv_matches_reference_and_drops_padding_slots(rng, head_dim, block_size):
    batch = make_batch(
        rng,
        [37, 5, 0],
        [21, 1, 0],
        num_tokens=27,
        group=1,
        head_dim=head_dim,
        block_size=block_size,
        dtype=jnp.bfloat16,
    )
    new_shape = (27, NUM_KV_HEADS, head_dim)
    k = jnp.asarray(rng.standard_normal(new_shape), jnp.bfloat16)
    v = jnp.asarray(rng.standard_normal(new_shape), jnp.bfloat16)
    args = (batch.k_cache, batch.v_cache, k, v, batch.md.slot_mapping)

    expected_k = np.array(batch.k_cache)
    for t, slot in enumerate(np.asarray(batch.md.slot_mapping)):
        if slot >= 0:
            expected_k[:, slot // block_size, slot % block_size] = k[t]
    reference = write_kv_reference(*args)
    np.testing.assert_array_equal(reference[0], expected_k)
    kernel = write_kv(*args, block_tokens=8, interpret=True)
    for got, want in zip(kernel, reference):
        np.testing.assert_array_equal(got, want)


def _cache_copies(hlo_text: str, cache_dims: str) -> list[str]:
    """Lines of compiled HLO that copy a whole cache (either view of it)."""
    pattern = re.compile(rf"= \w+\[({cache_dims})\]\S* copy(-start)?\(")
    return [line for line in hlo_text.splitlines() if pattern.search(line)]


@pytest.mark.parametrize("impl", ["reference", "pallas"])
def test_write_kv_leaves_the_donated_cache_uncopied(impl):
    # On CPU the Pallas kernel runs interpreted; the compiled Triton call can only be
    # checked the same way on the GPU (issue 3).
    fn = write_kv_reference if impl == "reference" else functools.partial(write_kv, interpret=True)
    cache = jax.ShapeDtypeStruct((NUM_KV_HEADS, 64, 16, 64), jnp.bfloat16)
    new = jax.ShapeDtypeStruct((32, NUM_KV_HEADS, 64), jnp.bfloat16)
    slots = jax.ShapeDtypeStruct((32,), jnp.int32)
    step = jax.jit(fn, donate_argnums=(0, 1))
    hlo = step.lower(cache, cache, new, new, slots).compile().as_text()
    assert "input_output_alias" in hlo
    assert not _cache_copies(hlo, "2,64,16,64|2,1024,64")


# ---------------------------------------------------------- references vs numpy


@pytest.mark.parametrize("sliding_window,soft_cap", [(None, None), (20, 5.0)])
def test_decode_reference_matches_dense_numpy(rng, sliding_window, soft_cap):
    batch = decode_batch(rng, [1, 15, 16, 17, 70, 0], group=3, head_dim=64, block_size=16)
    md = batch.md
    got = paged_decode_attention_reference(
        *decode_inputs(batch), scale=0.125, soft_cap=soft_cap, sliding_window=sliding_window
    )
    want = dense_attention_numpy(
        batch.q,
        batch.k_cache,
        batch.v_cache,
        md.block_tables,
        md.seq_lens,
        token_to_seq=np.arange(6),
        positions=np.asarray(md.seq_lens) - 1,
        is_query=np.asarray(md.seq_lens) > 0,
        scale=0.125,
        soft_cap=soft_cap,
        sliding_window=sliding_window,
    )
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("sliding_window,soft_cap", [(None, None), (12, 5.0)])
def test_ragged_reference_matches_dense_numpy(rng, sliding_window, soft_cap):
    # Prefill from scratch, a chunk starting mid-page on a cached prefix, a decode
    # token, an empty row, then padding tokens.
    batch = make_batch(rng, [20, 40, 9, 0], [20, 13, 1, 0], num_tokens=40, group=4, head_dim=64, block_size=16)
    md = batch.md
    got = ragged_paged_attention_reference(
        batch.q,
        batch.k_cache,
        batch.v_cache,
        md.query_start_loc,
        md.seq_lens,
        md.block_tables,
        scale=0.125,
        soft_cap=soft_cap,
        sliding_window=sliding_window,
    )
    want = dense_attention_numpy(
        batch.q,
        batch.k_cache,
        batch.v_cache,
        md.block_tables,
        md.seq_lens,
        batch.token_to_seq,
        md.positions,
        is_query=np.arange(40) < int(md.query_start_loc[-1]),
        scale=0.125,
        soft_cap=soft_cap,
        sliding_window=sliding_window,
    )
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------ decode kernel

# (group, head_dim, block_size, num_splits, block_kv, sliding_window, soft_cap, dtype)
DECODE_CASES = [
    (1, 64, 16, 1, 64, None, None, jnp.float32),
    (3, 128, 32, 3, 16, 50, None, jnp.float32),  # kv blocks smaller than a page
    (4, 64, 32, None, 32, None, 10.0, jnp.bfloat16),  # splits from the table
    (8, 128, 16, 4, 32, 40, 10.0, jnp.bfloat16),
    (4, 64, 16, 8, 16, None, None, jnp.float32),  # more splits than most rows' blocks
    (2, 64, 16, 2, 16, None, 10.0, jnp.float32),  # several blocks per split
]


@pytest.mark.parametrize("group,head_dim,block_size,num_splits,block_kv,sliding_window,soft_cap,dtype", DECODE_CASES)
def test_paged_decode_attention_matches_reference(
    rng, group, head_dim, block_size, num_splits, block_kv, sliding_window, soft_cap, dtype
):
    # Lengths 1, page-1, page, page+1, long, and padding rows of length 0.
    lens = [1, block_size - 1, 0, block_size, block_size + 1, 5 * block_size + 3, 0]
    batch = decode_batch(rng, lens, group=group, head_dim=head_dim, block_size=block_size, dtype=dtype)
    kw = dict(scale=head_dim**-0.5, soft_cap=soft_cap, sliding_window=sliding_window)
    got = paged_decode_attention(*decode_inputs(batch), num_splits=num_splits, block_kv=block_kv, interpret=True, **kw)
    want = paged_decode_attention_reference(*decode_inputs(batch), **kw)
    assert got.dtype == dtype
    assert_close(got, want, dtype)
    np.testing.assert_array_equal(np.asarray(got)[[2, 6]], 0)


def test_threaded_decode_tickets_come_back_zero_for_the_next_call(rng):
    # The engine hands one layer's tickets from step to step with no memset: the merging
    # split must leave each it used at zero. Two calls on other rows and lengths (one
    # that merges 3 splits per row, then one of fewer rows than the buffer holds), each
    # checked against the reference: a ticket left over would skip or repeat a merge.
    tickets = new_decode_tickets(NUM_KV_HEADS, 8)
    kw = dict(scale=32**-0.5)
    for lens in ([40, 7, 0, 33, 48], [100, 1, 17]):
        batch = decode_batch(rng, lens, group=4, head_dim=32, block_size=16)
        got, tickets = paged_decode_attention(
            *decode_inputs(batch), num_splits=3, block_kv=16, interpret=True, decode_tickets=tickets, **kw
        )
        assert_close(got, paged_decode_attention_reference(*decode_inputs(batch), **kw), jnp.float32)
        assert tickets.shape == (NUM_KV_HEADS, 8)
        np.testing.assert_array_equal(np.asarray(tickets), 0)
    with pytest.raises(ValueError, match="decode_tickets must be int32"):
        paged_decode_attention(
            *decode_inputs(batch), interpret=True, decode_tickets=new_decode_tickets(NUM_KV_HEADS, 2), **kw
        )


@pytest.mark.parametrize("head_dim", [64, 128])
def test_decode_splits_grow_with_context_and_shrink_with_batch(head_dim):
    assert decode_config(1, 32768, head_dim).num_splits > decode_config(1, 512, head_dim).num_splits
    assert decode_config(256, 2048, head_dim).num_splits <= decode_config(8, 2048, head_dim).num_splits
    # Beyond the table: its last cell.
    assert decode_config(1024, 10**6, head_dim) == DECODE_TABLES[head_dim][-1][-1]


def test_decode_config_takes_the_next_listed_head_dim_up():
    assert decode_config(1, 512, 32) == decode_config(1, 512, 64)
    assert decode_config(1, 512, 80) == decode_config(1, 512, 128)
    assert decode_config(1, 512, 256) == decode_config(1, 512, 128)


def test_decode_config_fields_override_one_by_one(rng):
    # The table's config at this shape, one field changed, gives the same answer as the
    # whole config written out: the launcher merges the two.
    batch = decode_batch(rng, [40, 7, 0], group=4, head_dim=32, block_size=16)
    kw = dict(scale=32**-0.5, interpret=True)
    custom = DecodeConfig(num_splits=3, block_kv=16, num_warps=2, num_stages=2)
    got = paged_decode_attention(*decode_inputs(batch), config=custom, **kw)
    overridden = paged_decode_attention(*decode_inputs(batch), config=custom, num_splits=2, **kw)
    want = paged_decode_attention_reference(*decode_inputs(batch), scale=32**-0.5)
    assert_close(got, want, jnp.float32)
    assert_close(overridden, want, jnp.float32)


# ------------------------------------------------------------ ragged kernel

# (group, head_dim, block_size, block_q, sliding_window, soft_cap, dtype)
RAGGED_CASES = [
    (1, 128, 16, 16, None, None, jnp.float32),
    (3, 64, 32, None, 24, None, jnp.float32),
    (4, 128, 32, 4, None, 20.0, jnp.bfloat16),
    (8, 64, 16, 2, 17, 20.0, jnp.bfloat16),
]


@pytest.mark.parametrize("group,head_dim,block_size,block_q,sliding_window,soft_cap,dtype", RAGGED_CASES)
def test_ragged_paged_attention_matches_reference(
    rng, group, head_dim, block_size, block_q, sliding_window, soft_cap, dtype
):
    page = block_size
    # (context, query): a prefill of several query blocks, a chunk starting
    # mid-page on a cached prefix, decode tokens at page-1 / page / page+1, an
    # empty row in the middle, a one-token prefill; then padding rows and tokens.
    seqs = [
        (2 * page + 5, 2 * page + 5),
        (3 * page + 2, page + 7),
        (page - 1, 1),
        (0, 0),
        (page, 1),
        (page + 1, 1),
        (1, 1),
        (0, 0),
    ]
    context_lens, query_lens = zip(*seqs)
    num_tokens = sum(query_lens) + 5
    batch = make_batch(
        rng,
        context_lens,
        query_lens,
        num_tokens=num_tokens,
        group=group,
        head_dim=head_dim,
        block_size=block_size,
        dtype=dtype,
    )
    md = batch.md
    args = (batch.q, batch.k_cache, batch.v_cache, md.query_start_loc, md.seq_lens, md.block_tables)
    kw = dict(scale=head_dim**-0.5, soft_cap=soft_cap, sliding_window=sliding_window)
    got = ragged_paged_attention(*args, block_q=block_q, block_kv=32, interpret=True, **kw)
    want = ragged_paged_attention_reference(*args, **kw)
    assert got.dtype == dtype
    assert_close(got, want, dtype)
    np.testing.assert_array_equal(np.asarray(got)[-5:], 0)  # Padding tokens.


def test_ragged_kernel_agrees_with_decode_kernel_on_a_decode_batch(rng):
    # Padding rows last, as the engine lays them out: token s is then sequence s.
    batch = decode_batch(rng, [33, 1, 16, 0], group=4, head_dim=64, block_size=16)
    md = batch.md
    ragged = ragged_paged_attention(
        batch.q,
        batch.k_cache,
        batch.v_cache,
        md.query_start_loc,
        md.seq_lens,
        md.block_tables,
        scale=0.125,
        interpret=True,
    )
    decode = paged_decode_attention(*decode_inputs(batch), scale=0.125, num_splits=2, block_kv=16, interpret=True)
    assert_close(ragged, decode, jnp.float32)


# ------------------------------------------------- lowering for the H100 (no GPU)

_H100 = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="cuda")


def _lower_for_h100(fn, *args):
    mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=_H100)
    with jax.sharding.use_abstract_mesh(mesh):
        return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))


def _triton_calls(lowered):
    """(name, num_warps, num_stages, TTIR text) of each Triton custom call."""
    from jax._src.lib import triton as jax_triton  # Only to print the TTIR.
    from jax._src.lib.mlir import ir
    from jax._src.interpreters import mlir as jax_mlir

    calls = []
    for op in lowered.compiler_ir("stablehlo").body.operations:
        for block in (b for r in op.regions for b in r.blocks):
            for call in block.operations:
                if call.name != "stablehlo.custom_call":
                    continue
                config = call.attributes["mhlo.backend_config"]
                # JAX's own context: it knows `gpu.barrier`, the decode kernel's CTA barrier.
                with jax_mlir.make_ir_context() as ctx:
                    jax_triton.dialect.register_dialect(ctx)
                    ctx.load_all_available_dialects()
                    ttir = ir.Module.parse(ir.StringAttr(config["ir"]).value_bytes)
                    calls.append(
                        (
                            ir.StringAttr(config["name"]).value,
                            ir.IntegerAttr(config["num_warps"]).value,
                            ir.IntegerAttr(config["num_stages"]).value,
                            ttir.operation.get_asm(),
                        )
                    )
    return calls


def _h100_kernels():
    """Every launcher at production-like shapes: bf16, 32 q / 8 kv heads."""
    spec = jax.ShapeDtypeStruct
    i32 = jnp.int32
    for head_dim, block_size in [(64, 16), (128, 16), (128, 32)]:
        cache = spec((8, 4096, block_size, head_dim), jnp.bfloat16)
        tokens = spec((2048, 32, head_dim), jnp.bfloat16)
        # Every config of the table (splits, block, warps, stages), with a window.
        configs = sorted(set(itertools.chain(*DECODE_TABLES[head_dim])), key=dataclasses.astuple)
        for config in configs:
            name = f"decode-d{head_dim}-p{block_size}-" + "-".join(map(str, dataclasses.astuple(config)))
            yield pytest.param(
                name,
                functools.partial(paged_decode_attention, scale=0.1, config=config, sliding_window=512),
                (spec((64, 32, head_dim), jnp.bfloat16), cache, cache, spec((64,), i32), spec((64, 256), i32)),
                id=name,
            )
        name = f"ragged-d{head_dim}-p{block_size}"
        yield pytest.param(
            name,
            functools.partial(ragged_paged_attention, scale=0.1, soft_cap=30.0),
            (tokens, cache, cache, spec((65,), i32), spec((64,), i32), spec((64, 256), i32)),
            id=name,
        )
        name = f"kv_write-d{head_dim}-p{block_size}"
        new = spec((2048, 8, head_dim), jnp.bfloat16)
        yield pytest.param(name, write_kv, (cache, cache, new, new, spec((2048,), i32)), id=name)


@pytest.mark.parametrize("name,fn,args", list(_h100_kernels()))
def test_kernel_compiles_for_h100_without_spills(name, fn, args):
    """Lowers to Triton IR for an abstract H100; where the `triton` package is
    installed (it comes with torch), compiles that IR to sm_90a and asks ptxas
    whether registers spill."""
    lowered = _lower_for_h100(fn, *args)
    calls = _triton_calls(lowered)
    assert len(calls) == 1
    if name.startswith("kv_write"):
        assert "output_operand_aliases" in lowered.as_text()
    if name.startswith("decode"):
        # The kv splits are merged inside the kernel: no XLA reduction after it.
        assert "stablehlo.reduce" not in lowered.as_text()
    triton = pytest.importorskip("triton")
    if tuple(map(int, triton.__version__.split(".")[:2])) < (3, 6):
        pytest.skip("older Triton than the GPU machine's 3.6 may not parse this TTIR")
    from triton.backends.compiler import GPUTarget

    _, num_warps, num_stages, ttir = calls[0]
    with tempfile.TemporaryDirectory() as tmp:
        ttir_path, ptx_path = os.path.join(tmp, "k.ttir"), os.path.join(tmp, "k.ptx")
        with open(ttir_path, "w") as f:
            f.write(ttir)
        compiled = triton.compile(
            ttir_path, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps, num_stages=num_stages)
        )
        with open(ptx_path, "w") as f:
            f.write(compiled.asm["ptx"])
        ptxas = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/ptxas")
        report = subprocess.run(
            [ptxas, "-v", "--gpu-name", "sm_90a", ptx_path, "-o", os.devnull],
            capture_output=True,
            text=True,
            check=True,
        ).stderr
    assert "0 bytes spill stores" in report, report
