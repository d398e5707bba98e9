"""The device layout of weight-only quantized linears, and host-side (numpy) packing.

Every format becomes pallas_kernels/quantized_matmul.py's layout once, at load: int32
`qweight` [K // pack, N] packed along K, `scales` [G, N], `qzeros` [G, N] as floats (absent
when symmetric), and `g_perm` [K] where GPTQ's act order puts rows of one group apart.
"""

from __future__ import annotations

import numpy as np


def pack_factor(bits: int) -> int:
    return 32 // bits


def unpack_rows(packed: np.ndarray, bits: int) -> np.ndarray:
    """int32 [R, N] packed along rows (value j of row r at bits j * bits) -> int [R * pack, N]."""
    pack = pack_factor(bits)
    shifts = (np.arange(pack, dtype=np.uint32) * bits)[None, :, None]
    values = (packed.view(np.uint32)[:, None, :] >> shifts) & ((1 << bits) - 1)
    return values.reshape(-1, packed.shape[1]).astype(np.int32)


def pack_rows(values: np.ndarray, bits: int) -> np.ndarray:
    """The inverse of `unpack_rows`."""
    pack = pack_factor(bits)
    grouped = values.astype(np.uint32).reshape(-1, pack, values.shape[1])
    shifts = (np.arange(pack, dtype=np.uint32) * bits)[None, :, None]
    return np.bitwise_or.reduce(grouped << shifts, axis=1).view(np.int32)


def unpack_cols(packed: np.ndarray, bits: int, order: tuple[int, ...] | None = None) -> np.ndarray:
    """int32 [R, N // pack] packed along columns -> int [R, N]. Slot i of packed column c
    holds column c * pack + order[i] (AutoAWQ interleaves; GPTQ keeps order i)."""
    pack = pack_factor(bits)
    shifts = np.arange(pack, dtype=np.uint32) * bits
    slots = (packed.view(np.uint32)[:, :, None] >> shifts) & ((1 << bits) - 1)
    values = np.empty_like(slots)
    values[:, :, list(order or range(pack))] = slots
    return values.reshape(packed.shape[0], -1).astype(np.int32)


def device_tensors(
    values: np.ndarray, scales: np.ndarray, zeros: np.ndarray | None, bits: int, perm: np.ndarray | None
) -> dict[str, np.ndarray]:
    """Integer weights [K, N] (rows already in `perm` order), scales and zero points
    [G, N] -> the device layout's tensors."""
    out = {"qweight": pack_rows(values, bits), "scales": scales}
    if zeros is not None:
        out["qzeros"] = zeros.astype(np.float32)
    if perm is not None:
        out["g_perm"] = perm.astype(np.int32)
    return out
