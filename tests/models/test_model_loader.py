"""Dummy weights (load_format="dummy"): real shapes, vLLM's range, reproducible by seed."""

import jax
import jax.numpy as jnp
import numpy as np

from jllm.models.llama import DecoderSpec, LlamaForCausalLM
from jllm.config import ParallelConfig
from jllm.distributed.mesh import make_mesh
from jllm.models.model_loader import dummy_params, param_shardings, param_shapes

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
    shapes, specs = param_shapes(model, SPEC, {"cos_sin": np.zeros((64, 8), np.float32)})
    shardings = param_shardings(make_mesh(ParallelConfig()), specs)
    params = dummy_params(shapes, shardings, seed=0)
    assert jax.tree.map(lambda x: (x.shape, x.dtype), params) == jax.tree.map(lambda x: (x.shape, x.dtype), shapes)
    layer = params["params"]["layers_0"]
    assert layer["self_attn"]["q_proj"].shape == (32, 4, 8)
    np.testing.assert_array_equal(np.asarray(layer["input_layernorm"]["weight"], np.float32), 1.0)
    q = np.asarray(layer["self_attn"]["q_proj"], np.float32)
    assert -1e-3 <= q.min() < -5e-4 and 5e-4 < q.max() <= 1e-3
    again = dummy_params(shapes, shardings, seed=0)["params"]["layers_0"]["self_attn"]["q_proj"]
    np.testing.assert_array_equal(np.asarray(again, np.float32), q)
    other = dummy_params(shapes, shardings, seed=1)["params"]["layers_0"]["self_attn"]["q_proj"]
    assert not np.array_equal(np.asarray(other, np.float32), q)


def test_tensor_parallel_shardings_split_heads_ffn_and_vocabulary():
    """Megatron's layout: q/k/v by output heads, o_proj and down_proj by their input rows,
    gate/up by ffn columns, embedding and LM head by vocabulary; norms whole. Each device
    holds only its slice of the dummy weights."""
    mesh = make_mesh(ParallelConfig(tensor_parallel_size=2))
    model = LlamaForCausalLM(SPEC, jnp.float32, mesh=mesh)
    shapes, specs = param_shapes(model, SPEC, {"cos_sin": np.zeros((64, 8), np.float32)})
    layer = specs["params"]["layers_0"]
    P = jax.sharding.PartitionSpec
    assert layer["self_attn"]["q_proj"] == P(None, "tp", None)
    assert layer["self_attn"]["k_proj"] == P(None, "tp", None)
    assert layer["self_attn"]["o_proj"] == P("tp", None, None)
    assert layer["mlp"]["gate_proj"] == P(None, "tp") and layer["mlp"]["down_proj"] == P("tp", None)
    assert layer["input_layernorm"]["weight"] == P()
    assert specs["params"]["embed_tokens"] == P("tp", None) and specs["params"]["lm_head"] == P(None, "tp")
    params = dummy_params(shapes, param_shardings(mesh, specs), seed=0)
    q = params["params"]["layers_0"]["self_attn"]["q_proj"]
    assert [s.data.shape for s in q.addressable_shards] == [(32, 2, 8), (32, 2, 8)]


def test_fewer_kv_heads_than_devices_keeps_k_and_v_whole():
    """With 2 kv heads over 4 devices, each kv head is replicated (vLLM's
    num_kv_head_replicas): k_proj and v_proj stay whole on every device."""
    mesh = make_mesh(ParallelConfig(tensor_parallel_size=4))
    _, specs = param_shapes(LlamaForCausalLM(SPEC, jnp.float32, mesh=mesh), SPEC, {"cos_sin": np.zeros((64, 8))})
    attn = specs["params"]["layers_0"]["self_attn"]
    P = jax.sharding.PartitionSpec
    assert attn["k_proj"] == P(None, None, None) and attn["q_proj"] == P(None, "tp", None)
