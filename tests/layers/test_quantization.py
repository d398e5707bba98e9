"""AWQ / GPTQ detection and checkpoint conversion: configs parsed as vLLM's AWQConfig /
GPTQConfig read them, clear errors for what is not supported, and each format's tensors
converted to the device layout so that dequantizing gives back the packed weights."""

from __future__ import annotations

import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jllm import LLM
from jllm.engine.arg_utils import EngineArgs
from jllm.layers.quantization import AWQConfig, GPTQConfig, get_quantization_config
from jllm.layers.quantization.layout import pack_rows, unpack_rows
from pallas_kernels.quantized_matmul import dequantize, quantized_matmul
from quantized_checkpoints import _pack


def _hf_config(**quantization_config):
    return types.SimpleNamespace(quantization_config=quantization_config or None)


def test_awq_config_from_checkpoint():
    config = get_quantization_config(_hf_config(quant_method="awq", bits=4, group_size=128, zero_point=True), None)
    assert config == AWQConfig(weight_bits=4, group_size=128, zero_point=True)
    assert config.get_name() == "awq"


def test_gptq_config_from_checkpoint():
    hf = _hf_config(quant_method="gptq", bits=8, group_size=-1, sym=False, desc_act=True, checkpoint_format="gptq_v2")
    config = get_quantization_config(hf, "gptq")
    assert config == GPTQConfig(weight_bits=8, group_size=-1, zero_point=True, desc_act=True, zeros_minus_one=False)
    assert config.device_tensor_names() == ("qweight", "scales", "qzeros", "g_perm")


@pytest.mark.parametrize(
    "hf_config, quantization, message",
    [
        (_hf_config(quant_method="gptq", bits=4, group_size=128), "awq", r"model config \(gptq\) does not match"),
        (_hf_config(), "gptq", "needs a gptq checkpoint"),
        (_hf_config(quant_method="gptq", bits=3, group_size=128), None, "only \\[4, 8\\]-bit"),
        (_hf_config(quant_method="awq", bits=4, group_size=96), None, "group_size 96 is not supported"),
        (_hf_config(quant_method="awq", bits=4, group_size=128, version="gemv"), None, "'gemv' is not supported"),
        (_hf_config(quant_method="gptq", bits=4, group_size=128, checkpoint_format="marlin"), None, "'marlin'"),
        (_hf_config(quant_method="fp8"), None, "Unknown quantization method: fp8"),
    ],
)
def test_unsupported_quantization_is_refused_at_startup(hf_config, quantization, message):
    with pytest.raises(ValueError, match=message):
        get_quantization_config(hf_config, quantization)


def test_engine_args_accept_awq_and_gptq_and_refuse_others_by_name():
    EngineArgs(quantization="awq")
    EngineArgs(quantization="gptq")
    with pytest.raises(ValueError, match="quantization='fp8' is not supported"):
        EngineArgs(quantization="fp8")


def test_family_without_quantized_layers_is_refused(tmp_path):
    config = dict(
        architectures=["OPTForCausalLM"],
        model_type="opt",
        vocab_size=64,
        hidden_size=16,
        ffn_dim=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=32,
        quantization_config=dict(quant_method="awq", bits=4, group_size=128, zero_point=True),
    )
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="OPTForCausalLM does not support awq quantization"):
        LLM(model=str(tmp_path), skip_tokenizer_init=True)


def test_pack_rows_round_trips():
    values = np.random.default_rng(0).integers(0, 256, (16, 5))
    assert np.array_equal(unpack_rows(pack_rows(values, 8), 8), values)


def _dequantized(tensors, bits):
    qzeros = tensors.get("qzeros")
    return np.asarray(dequantize(jnp.asarray(tensors["qweight"]), jnp.asarray(tensors["scales"]), qzeros, bits=bits))


def test_awq_interleaved_nibbles_convert_to_the_device_layout():
    """AutoAWQ's GEMM packing (tests/quantized_checkpoints.py) -> the device layout."""
    rng = np.random.default_rng(0)
    q, zeros = rng.integers(0, 16, (64, 16)), rng.integers(0, 16, (2, 16))
    scales = rng.uniform(0.5, 1.0, (2, 16)).astype(np.float32)
    config = AWQConfig(weight_bits=4, group_size=32, zero_point=True)
    tensors = config.layer_to_device(
        {
            "qweight": _pack(q, 4, axis=1, order=(0, 2, 4, 6, 1, 3, 5, 7)),
            "qzeros": _pack(zeros, 4, axis=1, order=(0, 2, 4, 6, 1, 3, 5, 7)),
            "scales": scales,
        }
    )
    expected = (q - np.repeat(zeros, 32, 0)) * np.repeat(scales, 32, 0)
    np.testing.assert_allclose(_dequantized(tensors, 4), expected, rtol=1e-6)


def test_gptq_act_order_sorts_rows_by_group_and_keeps_the_permutation():
    rng = np.random.default_rng(1)
    q, zeros = rng.integers(0, 16, (64, 8)), rng.integers(1, 16, (2, 8))
    scales = rng.uniform(0.5, 1.0, (2, 8)).astype(np.float32)
    g_idx = np.empty(64, np.int32)
    g_idx[rng.permutation(64)] = np.arange(64) // 32
    config = GPTQConfig(weight_bits=4, group_size=32, zero_point=True, desc_act=True)
    tensors = config.layer_to_device(
        {"qweight": _pack(q, 4, axis=0), "qzeros": _pack(zeros - 1, 4, axis=1), "scales": scales, "g_idx": g_idx}
    )
    perm = tensors["g_perm"]
    assert np.array_equal(g_idx[perm], np.arange(64) // 32)
    expected = (q - zeros[g_idx]) * scales[g_idx]
    np.testing.assert_allclose(_dequantized(tensors, 4), expected[perm], rtol=1e-6)
    x = np.random.default_rng(2).normal(size=(3, 64)).astype(np.float32)
    np.testing.assert_allclose(x[:, perm] @ _dequantized(tensors, 4), x @ expected, rtol=1e-4, atol=1e-4)


def test_quantized_llama_declares_packed_int32_weights():
    from jllm.models.llama import FAMILY, DecoderSpec
    from jllm.models.model_loader import param_shapes

    spec = DecoderSpec(
        vocab_size=32,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        quant_config=GPTQConfig(weight_bits=4, group_size=32, zero_point=False),
    )
    model = FAMILY.module(spec, jnp.float32)
    shapes, _ = param_shapes(model, spec, {"cos_sin": np.zeros((8, 16), np.float32)})
    down = shapes["params"]["layers_0"]["mlp"]["down_proj"]
    assert down["qweight"] == jax.ShapeDtypeStruct((128 // 8, 64), jnp.int32)
    assert down["scales"].shape == (4, 64) and "qzeros" not in down
    assert shapes["params"]["embed_tokens"].dtype == jnp.float32


@pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated:DeprecationWarning")
@pytest.mark.parametrize("sharding", [(None, "tp"), ("tp", None)], ids=["column", "row"])
def test_kernel_path_at_tp2_equals_reference(monkeypatch, sharding):
    """The kernel runs per shard under shard_map (interpret mode here), a row split summing
    the partial products, and equals the reference path that XLA partitions itself."""
    from jax.sharding import Mesh

    from jllm.layers import linear as linear_module

    monkeypatch.setattr(linear_module, "quantized_matmul", lambda *a, **kw: quantized_matmul(*a, **kw, interpret=True))
    mesh = Mesh(np.array(jax.devices()[:2]), ("tp",))
    config = GPTQConfig(weight_bits=4, group_size=32, zero_point=True, desc_act=True)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(3, 128)), jnp.float32)

    def layer(use_kernel):
        return linear_module.QuantizedLinear(128, 64, config, jnp.float32, sharding, use_kernel, mesh)

    params = {
        "params": {
            "qweight": jnp.asarray(rng.integers(-(2**31), 2**31, (16, 64)), jnp.int32),
            "scales": jnp.asarray(rng.uniform(0.01, 0.1, (4, 64)), jnp.float32),
            "qzeros": jnp.asarray(rng.integers(0, 16, (4, 64)), jnp.float32),
            "g_perm": jnp.asarray(rng.permutation(128), jnp.int32),
        }
    }
    out = jax.jit(layer(True).apply)(params, x)
    reference = jax.jit(layer(False).apply)(params, x)
    np.testing.assert_allclose(np.asarray(out), np.asarray(reference), rtol=1e-4, atol=1e-4 * np.abs(reference).max())
