"""Dummy weights (load_format="dummy"): real shapes, vLLM's range, reproducible by seed."""

import jax
import jax.numpy as jnp
import numpy as np

from jllm.models.llama import DecoderSpec, LlamaForCausalLM
from jllm.models.model_loader import dummy_params, param_shapes

SPEC = DecoderSpec(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)


def test_dummy_params_have_the_model_shapes_and_vllm_range():
    model = LlamaForCausalLM(SPEC, jnp.bfloat16)
    shapes = param_shapes(model, SPEC, {"cos_sin": np.zeros((64, 8), np.float32)})
    params = dummy_params(shapes, seed=0)
    assert jax.tree.map(lambda x: (x.shape, x.dtype), params) == jax.tree.map(lambda x: (x.shape, x.dtype), shapes)
    layer = params["params"]["layers_0"]
    assert layer["self_attn"]["q_proj"].shape == (32, 4, 8)
    np.testing.assert_array_equal(np.asarray(layer["input_layernorm"]["weight"], np.float32), 1.0)
    q = np.asarray(layer["self_attn"]["q_proj"], np.float32)
    assert -1e-3 <= q.min() < -5e-4 and 5e-4 < q.max() <= 1e-3
    again = dummy_params(shapes, seed=0)["params"]["layers_0"]["self_attn"]["q_proj"]
    np.testing.assert_array_equal(np.asarray(again, np.float32), q)
    other = dummy_params(shapes, seed=1)["params"]["layers_0"]["self_attn"]["q_proj"]
    assert not np.array_equal(np.asarray(other, np.float32), q)
