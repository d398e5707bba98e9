"""Rotary embeddings against HF transformers, for every rope type jllm accepts.

The reference is transformers' own Llama code: `LlamaRotaryEmbedding` (which calls
`ROPE_INIT_FUNCTIONS[rope_type]`) for the inverse frequencies and cos/sin, and
`apply_rotary_pos_emb` for the rotation of q and k. jllm's side is what the engine runs:
`rope_parameters` on the HF config, the host `cos_sin_cache` gathered by position, and
`apply_rotary` as `jllm/models/llama.py` calls it. Types other than 'default', 'linear'
and 'llama3' must be refused, not run as something else.
"""

import functools
import types

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from jllm.layers.rotary import apply_rotary, compute_inv_freq, cos_sin_cache, rope_parameters

MAX_POSITIONS = 131072  # Llama 3.1's max_position_embeddings
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
ROPES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
    # Llama 3.1's settings.
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_theta": 500000.0,
    },
}
# 80: a head size that is not a power of two (40 frequencies).
HEAD_DIMS = (64, 128, 80)
# Page and llama3 edges (8191/8192), and the last positions of the table.
POSITIONS = np.array([0, 1, 2, 15, 16, 17, 1000, 8191, 8192, 8193, 65537, MAX_POSITIONS - 2, MAX_POSITIONS - 1])
# jllm's inverse frequencies come from numpy's float32 pow, HF's from torch's; the two
# round differently, up to 2 ulps apart (in about 1 entry in 6).
INV_FREQ_MAX_ULP = 2


def hf_config(rope: str, head_dim: int) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=256,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=head_dim,
        max_position_embeddings=MAX_POSITIONS,
        rope_parameters=dict(ROPES[rope]),
    )


@functools.lru_cache(maxsize=None)
def jllm_table(rope: str, head_dim: int) -> np.ndarray:
    """The engine's table for this config (as ModelRunner builds it), over every position."""
    config = hf_config(rope, head_dim)
    return cos_sin_cache(head_dim, rope_parameters(config), config.max_position_embeddings, MAX_POSITIONS)


def hf_rotary(rope: str, head_dim: int) -> LlamaRotaryEmbedding:
    return LlamaRotaryEmbedding(hf_config(rope, head_dim))


def hf_cos_sin(rope: str, head_dim: int, positions: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """HF's [1, T, head_dim] cos and sin at `positions`, float32."""
    x = torch.zeros(1, len(positions), head_dim, dtype=torch.float32)
    return hf_rotary(rope, head_dim)(x, torch.as_tensor(positions)[None])


def angle_tolerance(rope: str, head_dim: int, positions: np.ndarray) -> np.ndarray:
    """[T, head_dim / 2] bound on |jllm angle - HF angle|: the inverse frequencies' ulps
    times the position, the float32 rounding of position * inv_freq on both sides, and
    the cos/sin evaluations. Tight near position 0; at position 131071 the float32 angle
    itself is only good to ~0.01 rad for the fastest frequency, in HF as in jllm."""
    inv_freq = hf_rotary(rope, head_dim).inv_freq.numpy().astype(np.float64)
    eps = float(np.finfo(np.float32).eps)
    return 1e-6 + (INV_FREQ_MAX_ULP + 1.5) * eps * positions[:, None] * inv_freq[None, :]


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("rope", list(ROPES))
def test_inverse_frequencies_match_hf(rope, head_dim):
    config = hf_config(rope, head_dim)
    got = compute_inv_freq(head_dim, rope_parameters(config), config.max_position_embeddings)
    want = hf_rotary(rope, head_dim).inv_freq.numpy()
    assert got.dtype == np.float32 and got.shape == (head_dim // 2,)
    np.testing.assert_array_max_ulp(got, want, maxulp=INV_FREQ_MAX_ULP)


@pytest.mark.parametrize("rope", ["linear", "llama3"])
def test_scaled_rope_types_change_the_frequencies(rope):
    """Each scaled type moves HF's inverse frequencies far beyond the ulps allowed above,
    so matching HF is not matching the default rope."""
    scaled = hf_rotary(rope, 128).inv_freq.numpy()
    config = hf_config(rope, 128)
    config.rope_parameters = {"rope_type": "default", "rope_theta": ROPES[rope]["rope_theta"]}
    unscaled = LlamaRotaryEmbedding(config).inv_freq.numpy()
    assert np.max(np.abs(scaled / unscaled - 1)) > 0.5


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("rope", list(ROPES))
def test_cos_sin_table_matches_hf_at_every_kind_of_position(rope, head_dim):
    table = jllm_table(rope, head_dim)
    assert table.shape == (MAX_POSITIONS, head_dim) and table.dtype == np.float32
    cos, sin = (t[0].numpy() for t in hf_cos_sin(rope, head_dim, POSITIONS))
    half = head_dim // 2
    # HF repeats the half-width angles (cat(freqs, freqs)); jllm stores each half once.
    rows = table[POSITIONS]
    tol = angle_tolerance(rope, head_dim, POSITIONS)
    for name, got, want in (("cos", rows[:, :half], cos), ("sin", rows[:, half:], sin)):
        for part in (want[:, :half], want[:, half:]):
            excess = np.abs(got - part) - tol
            assert excess.max() <= 0, f"{name}: worst at position {POSITIONS[excess.max(1).argmax()]}"


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("rope", list(ROPES))
def test_rotated_q_and_k_match_hf_apply_rotary_pos_emb(rope, head_dim):
    """jllm's table gathered by position and apply_rotary on [T, heads, head_dim] q (4 heads)
    and k (2 kv heads), against HF's cos/sin and apply_rotary_pos_emb on [1, heads, T, head_dim]."""
    rng = np.random.default_rng(head_dim)
    q = rng.standard_normal((len(POSITIONS), 4, head_dim)).astype(np.float32)
    k = rng.standard_normal((len(POSITIONS), 2, head_dim)).astype(np.float32)
    cos, sin = hf_cos_sin(rope, head_dim, POSITIONS)
    want_q, want_k = apply_rotary_pos_emb(
        torch.from_numpy(q).transpose(0, 1)[None], torch.from_numpy(k).transpose(0, 1)[None], cos, sin
    )
    cos_sin = jnp.asarray(jllm_table(rope, head_dim)[POSITIONS])
    tol = angle_tolerance(rope, head_dim, POSITIONS)
    for x, want in ((q, want_q), (k, want_k)):
        got = np.asarray(apply_rotary(jnp.asarray(x), cos_sin))
        want = want[0].transpose(0, 1).numpy()
        assert got.shape == x.shape
        # An angle error d turns the pair (x_j, x_j+half) by d: off by at most d * its norm.
        half = head_dim // 2
        norm = np.hypot(x[..., :half], x[..., half:])
        bound = np.concatenate([norm, norm], axis=-1) * np.concatenate([tol, tol], axis=-1)[:, None, :]
        assert np.all(np.abs(got - want) <= bound + 2e-6), np.max(np.abs(got - want) - bound)


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_apply_rotary_matches_hf_on_the_same_cos_sin(head_dim):
    """The rotation alone (rotate-half convention, which half gets which sign), fed HF's
    own cos/sin: only float32 rounding apart."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((len(POSITIONS), 3, head_dim)).astype(np.float32)
    cos, sin = hf_cos_sin("llama3", head_dim, POSITIONS)
    want, _ = apply_rotary_pos_emb(
        torch.from_numpy(x).transpose(0, 1)[None], torch.from_numpy(x).transpose(0, 1)[None], cos, sin
    )
    half = head_dim // 2
    cos_sin = jnp.asarray(np.concatenate([cos[0, :, :half].numpy(), sin[0, :, :half].numpy()], axis=-1))
    got = np.asarray(apply_rotary(jnp.asarray(x), cos_sin))
    np.testing.assert_allclose(got, want[0].transpose(0, 1).numpy(), rtol=0, atol=2e-6)


def test_rope_parameters_read_transformers_4_config_keys():
    """Configs as transformers 4.x exposed them: scaling under `rope_scaling` with the old
    'type' key, rope_theta as its own attribute, or no scaling at all."""
    legacy = types.SimpleNamespace(rope_scaling={"type": "linear", "factor": 4.0}, rope_theta=1e6)
    params = rope_parameters(legacy)
    assert (params["rope_type"], params["rope_theta"], params["factor"]) == ("linear", 1e6, 4.0)
    assert rope_parameters(types.SimpleNamespace(rope_scaling=None, rope_theta=5e5)) == {
        "rope_type": "default",
        "rope_theta": 5e5,
    }
    assert rope_parameters(types.SimpleNamespace()) == {"rope_type": "default", "rope_theta": 10000.0}


def test_a_transformers_4_config_json_gives_hf_frequencies():
    """A config.json written before rope_parameters existed, loaded by this transformers."""
    config = LlamaConfig.from_dict(
        {
            "hidden_size": 256,
            "num_attention_heads": 4,
            "max_position_embeddings": 4096,
            "rope_scaling": {"type": "linear", "factor": 2.0},
            "rope_theta": 1e6,
        }
    )
    got = compute_inv_freq(64, rope_parameters(config), config.max_position_embeddings)
    want = LlamaRotaryEmbedding(config).inv_freq.numpy()
    np.testing.assert_array_max_ulp(got, want, maxulp=INV_FREQ_MAX_ULP)
    default = LlamaConfig(hidden_size=256, num_attention_heads=4, rope_theta=1e6)
    assert not np.allclose(got, LlamaRotaryEmbedding(default).inv_freq.numpy())


def test_every_supported_type_is_one_transformers_knows():
    assert set(SUPPORTED_ROPE_TYPES) <= set(ROPE_INIT_FUNCTIONS) | {"default"}
    assert set(ROPES) == set(SUPPORTED_ROPE_TYPES)


@pytest.mark.parametrize("rope_type", sorted(set(ROPE_INIT_FUNCTIONS) - set(SUPPORTED_ROPE_TYPES)))
def test_rope_types_jllm_does_not_implement_are_refused_by_name(rope_type):
    """dynamic, yarn, longrope, ... (whatever transformers lists beyond the three): a
    ValueError naming the type, raised where the engine builds its table."""
    params = {"rope_type": rope_type, "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 4096}
    with pytest.raises(ValueError, match=rf"rope_type '{rope_type}' is not supported; supported: 'default'"):
        cos_sin_cache(64, params, 32768, 16)


def test_legacy_type_key_of_an_unsupported_scaling_is_refused():
    config = types.SimpleNamespace(rope_scaling={"type": "yarn", "factor": 4.0}, rope_theta=1e6)
    with pytest.raises(ValueError, match="rope_type 'yarn' is not supported"):
        cos_sin_cache(64, rope_parameters(config), 32768, 16)
