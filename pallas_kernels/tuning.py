"""Tuned launch settings of the Pallas kernels: the decode kernel's config per (head_dim, batch,
context), the ragged and KV-write kernels' block sizes. Each entry says where it was measured.

Records named `h100/<suffix>` are `scripts/results/kernels_nvidia-h100-80gb-hbm3_<suffix>.json`,
`h200/<suffix>` are `scripts/results/kernels_nvidia-h200_<suffix>.json`; sessions are those of the
session diary, `git show 92f4c8d:BUILD_NOTES.md`. All on jax 0.11.2, bf16, page 16, Llama-3.2-1B
(d 64) and Llama-3.1-8B (d 128) heads, 32 q / 8 kv.
`scripts/bench_kernels.py --decode-param-sweep` re-measures the decode cells and prints a suggested
`DECODE_TABLES`.
"""

from __future__ import annotations

import bisect
import dataclasses


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """How the decode kernel runs on one (batch, context) shape: kv splits per (sequence,
    kv head), keys per inner step (a power of two >= 16), and the Triton launch settings.
    Frozen and hashable: the engine hands it to the jitted step as static metadata."""

    num_splits: int
    # H100, 2026-11-26 (session 2), h100/2026-11-26_decode_params: no block_kv 32/128 or 8 warps beat these
    # beyond the run-to-run spread, and 3 stages ran 7-12 % faster than 2 at batch 64 (looped timing).
    block_kv: int = 64
    num_warps: int = 4
    num_stages: int = 3


# Rows: batch up to DECODE_BATCHES[i]; columns: context (tokens) up to DECODE_CONTEXTS[j]; past the
# last, the last. A head_dim takes the table of the next listed one up (past them, the last). Batch 1
# and 8: per cell the fastest config by profiled kernel time, or the default launch settings where
# those came within 1 %. From batch 64 the batch alone fills the SMs: one or two splits.
DECODE_BATCHES = (1, 8, 64, 256)
DECODE_CONTEXTS = (512, 2048, 8192, 32768)
_C = DecodeConfig
DECODE_TABLES = {
    64: (
        # 512: H100, 2026-12-07 (session 10), A/B vs 8 splits of 64 keys, 4.16 vs 4.35 us; h100/2026-12-07_d64_b1_b8.
        # 2048+: H100, 2026-11-26 (session 5), launch-setting sweep, h100/2026-11-26_111722_decode_params_d64.
        (_C(16, 32, 2, 2), _C(32), _C(32), _C(32)),  # batch 1
        # H100, 2026-11-26 (session 5), launch-setting sweep, h100/2026-11-26_111722_decode_params_d64.
        (_C(4, 64, 2), _C(4), _C(4), _C(8, 64, 2)),  # batch <= 8
        # H100, 2026-11-26 (session 4), split sweep by wall time, least worst slowdown over d64 and d128:
        # h100/2026-11-26_083721 and h100/2026-11-26_084719.
        (_C(1), _C(1), _C(1), _C(1)),  # batch <= 64
        (_C(1), _C(1), _C(2), _C(2)),  # batch <= 256 and beyond
    ),
    128: (
        # 512: H100, 2026-12-07 (session 10), A/B vs 8 splits of 64 keys, 5.47 vs 5.69 us; h100/2026-12-07_d128.
        # 2048+: H100, 2026-11-26 (session 5), launch-setting sweep, h100/2026-11-26_112232_decode_params_d128.
        (_C(16, 32, 4, 3), _C(16, 128, 4, 2), _C(32), _C(32)),  # batch 1
        # H100, 2026-11-26 (session 5), launch-setting sweep, h100/2026-11-26_112232_decode_params_d128.
        (_C(4, 64, 2), _C(4, 64, 2), _C(4, 64, 2), _C(4, 64, 2)),  # batch <= 8
        # H100, 2026-11-26 (session 4), split sweep by wall time, least worst slowdown over d64 and d128:
        # h100/2026-11-26_083721 and h100/2026-11-26_084719.
        (_C(1), _C(1), _C(1), _C(1)),  # batch <= 64
        (_C(1), _C(1), _C(2), _C(2)),  # batch <= 256 and beyond
    ),
}


def decode_config(batch: int, context: int, head_dim: int) -> DecodeConfig:
    """The decode config for a (batch, max context) shape of `head_dim`, from the tables."""
    dims = sorted(DECODE_TABLES)
    table = DECODE_TABLES[dims[min(bisect.bisect_left(dims, head_dim), len(dims) - 1)]]
    row = min(bisect.bisect_left(DECODE_BATCHES, batch), len(DECODE_BATCHES) - 1)
    col = min(bisect.bisect_left(DECODE_CONTEXTS, context), len(DECODE_CONTEXTS) - 1)
    return table[row][col]


# Ragged kernel: rows (tokens x query heads of one kv head) per tile. H200, 2026-11-26 (session 2),
# prefill sweep, h200/2026-11-26_0335: 1.4-1.65x faster than 64 rows at 2k-32k tokens.
RAGGED_BLOCK_ROWS = 128
# Keys per inner step and pipeline stages: the first landing's (2026-11-26), never changed. In the
# prefill sweeps 128 keys with 8 warps ran a lone fresh prefill 2-9 % faster (h200/2026-11-26_0335,
# h100/2026-11-26_064052), a step cuDNN takes now; mixed and prefix steps were not swept.
RAGGED_BLOCK_KV = 64
RAGGED_NUM_STAGES = 2

# KV write: tokens per program and warps, the first landing's, 2026-11-26, never swept. H100,
# 2026-11-26 (session 3), h100/2026-11-26_064052: 8192 tokens of d128 at 2.60 TB/s, 6x XLA's scatter.
KV_WRITE_BLOCK_TOKENS = 16
KV_WRITE_NUM_WARPS = 4

# Quantized matmul: the first landing's launch settings (2026-12-08), not yet measured on a GPU.
# K steps of up to 128 values (fewer where the group is smaller); at most 64 rows per program,
# so prefill batches tile over M while decode batches pad to Triton's 16.
QMATMUL_BLOCK_K = 128
QMATMUL_BLOCK_N = 64
QMATMUL_MAX_BLOCK_M = 64
QMATMUL_NUM_WARPS = 4
