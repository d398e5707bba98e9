"""One host-to-device transfer per step: a pytree of numpy arrays packed into one int32
buffer, and unpacked by static slices inside the jitted step (the layout is static, so
it is part of the jit key exactly as the arrays' shapes were)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np


@dataclasses.dataclass(frozen=True)
class PackedLayout:
    """Where each array of a packed pytree lies in its int32 buffer; static (hashable),
    so it is part of the jit key exactly as the arrays' shapes were."""

    treedef: Any
    leaves: tuple[tuple[tuple[int, ...], np.dtype], ...]  # (shape, dtype) of each leaf


def pack(tree) -> tuple[np.ndarray, PackedLayout]:
    """A pytree of 4-byte and bool numpy arrays -> one int32 buffer and its layout."""
    leaves, treedef = jax.tree.flatten(tree)
    layout = PackedLayout(treedef, tuple((x.shape, x.dtype) for x in leaves))
    return np.concatenate([_as_int32(x) for x in leaves]), layout


def _as_int32(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x).reshape(-1)
    if x.dtype == np.bool_:
        return x.astype(np.int32)
    if x.dtype.itemsize != 4:
        raise TypeError(f"pack takes 4-byte or bool arrays, got {x.dtype}")
    return x.view(np.int32)  # float32 and uint32 travel as their bits


def unpack(buffer: jax.Array, layout: PackedLayout):
    """Inverse of `pack`, inside jit: static slices of the buffer, bitcast back."""
    leaves, offset = [], 0
    for shape, dtype in layout.leaves:
        size = math.prod(shape)
        x = buffer[offset : offset + size].reshape(shape)
        offset += size
        if dtype == np.bool_:
            x = x != 0
        elif dtype != np.int32:
            x = jax.lax.bitcast_convert_type(x, dtype)
        leaves.append(x)
    return jax.tree.unflatten(layout.treedef, leaves)
