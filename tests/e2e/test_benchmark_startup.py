"""scripts/benchmark_startup.py: the random-weight safetensors folder it starts from, and a
tiny run of the whole comparison on the CPU (a conversion and a start of each variant, each in
its own process)."""

import json
import os

import numpy as np
import pytest

from jllm.models.loader.safetensors_loader import load_safetensors
from scripts import benchmark_startup


def test_random_weights_folder_has_the_models_tensors_in_vllms_dummy_range(tmp_path):
    total = benchmark_startup.write_random_safetensors(str(tmp_path), benchmark_startup.TINY_SHAPE)
    weights = load_safetensors(str(tmp_path), use_tqdm=False)
    assert weights["model.embed_tokens.weight"].shape == (512, 64)
    assert weights["lm_head.weight"].shape == (512, 64)  # Untied: saved on its own.
    assert weights["model.layers.1.self_attn.k_proj.weight"].shape == (2 * 16, 64)
    assert total == sum(w.nbytes for w in weights.values())
    assert all(w.dtype.name == "bfloat16" for w in weights.values())
    q = weights["model.layers.0.self_attn.q_proj.weight"].astype(np.float32)
    assert -1e-3 <= q.min() < -5e-4 and 5e-4 < q.max() <= 1e-3
    np.testing.assert_array_equal(weights["model.norm.weight"].astype(np.float32), 1.0)
    index = json.load(open(tmp_path / "model.safetensors.index.json"))
    assert set(index["weight_map"]) == set(weights)


@pytest.mark.slow
def test_startup_comparison_runs_end_to_end_on_the_cpu(tmp_path):
    """Four processes (this one's XLA_FLAGS give each 8 CPU devices): the conversion at TP 2
    and one start of each variant."""
    results = tmp_path / "results"
    flags = ["--enforce-eager", "--num-gpu-blocks-override", "64", "--max-model-len", "256"]
    record = benchmark_startup.main(
        ["--tiny", "-tp", "2", "--repeats", "1", "--workdir", str(tmp_path), "--results-dir", str(results), *flags]
    )
    assert record["device"] == "cpu" and record["tensor_parallel_size"] == 2
    for variant in ("safetensors", "orbax"):
        assert 0 < record[variant]["load_weights_s"]["median"] < record[variant]["ready_s"]["median"]
    assert os.listdir(tmp_path / "tiny_orbax_tp2")
    [written] = os.listdir(results)
    assert json.load(open(results / written)) == record
