"""Read a Hugging Face folder's *.safetensors (one file or index-sharded) into numpy arrays.

Names and layouts are left exactly as transformers saves them ([out, in] linears); the model
code maps them onto its own parameters.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator

# Imported for its side effect: safetensors' numpy backend asks numpy for BF16/F8 dtypes by
# name ("bfloat16"), which numpy only knows once ml_dtypes has registered them.
import ml_dtypes  # noqa: F401
import numpy as np
from safetensors import safe_open
from tqdm.auto import tqdm

SAFETENSORS_INDEX = "model.safetensors.index.json"


def safetensors_files(folder: str) -> list[str]:
    """The shards to read: those the index names, else every *.safetensors in the folder."""
    index_path = os.path.join(folder, SAFETENSORS_INDEX)
    if os.path.isfile(index_path):
        with open(index_path) as f:
            weight_map = json.load(f)["weight_map"]
        # The index wins over a glob: some repos also ship a consolidated copy of the weights.
        return [os.path.join(folder, name) for name in sorted(set(weight_map.values()))]
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if not files:
        raise ValueError(f"No *.safetensors files in {folder!r}.")
    return files


def iterate_safetensors(
    folder: str, dtype: str | np.dtype | None = None, use_tqdm: bool = True
) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (hf_name, array) shard by shard, so a caller can place each tensor and drop it."""
    target = np.dtype(dtype) if dtype is not None else None
    files = safetensors_files(folder)
    for path in tqdm(files, desc="Loading safetensors shards", disable=not use_tqdm or len(files) == 1):
        with safe_open(path, framework="numpy") as f:
            for name in f.keys():
                array = f.get_tensor(name)
                # Only floating tensors change type: integer buffers keep their meaning.
                if target is not None and _is_floating(array.dtype):
                    array = array.astype(target)
                yield name, array


def load_safetensors(folder: str, dtype: str | np.dtype | None = None, use_tqdm: bool = True) -> dict[str, np.ndarray]:
    """{hf_name: array} for every tensor in the folder; `dtype` (e.g. "bfloat16") casts floats."""
    return dict(iterate_safetensors(folder, dtype=dtype, use_tqdm=use_tqdm))


def _is_floating(dtype: np.dtype) -> bool:
    # ml_dtypes' bfloat16/float8 are not np.floating subclasses, so ask ml_dtypes about them too.
    if np.issubdtype(dtype, np.floating):
        return True
    try:
        ml_dtypes.finfo(dtype)
    except (TypeError, ValueError):
        return False
    return True
