"""`load_format="dummy"`: random weights at the model's real shapes, for benchmarks without a checkpoint.

Values follow vLLM's `initialize_dummy_weights`: uniform in [-1e-3, 1e-3].
"""
from __future__ import annotations

import ml_dtypes  # noqa: F401  (lets np.dtype() take "bfloat16")
import numpy as np

DUMMY_LOW, DUMMY_HIGH = -1e-3, 1e-3


def dummy_weights(
    param_shapes: dict[str, tuple[tuple[int, ...], np.dtype | str]], seed: int = 0
) -> dict[str, np.ndarray]:
    """{name: array} of the given (shape, dtype)s; norm scales are 1, everything else uniform small.

    Norm weights of ~1e-3 would shrink every activation towards zero (and into denormals on some
    hardware), so a dummy run would not exercise the numbers a real one does.
    """
    rng = np.random.default_rng(seed)
    weights = {}
    for name, (shape, dtype) in param_shapes.items():
        if "norm" in name:
            weights[name] = np.ones(shape, dtype=dtype)
            continue
        # float32 draws: float64 would double the host memory and time for nothing.
        values = rng.random(shape, dtype=np.float32)
        values = values * np.float32(DUMMY_HIGH - DUMMY_LOW) + np.float32(DUMMY_LOW)
        weights[name] = values.astype(dtype, copy=False)
    return weights
