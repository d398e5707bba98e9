"""The Llama-family decoder (Llama 2/3.x, SmolLM2, Mistral, Qwen2, Qwen3) as a Flax module.

One definition serves the family; `DecoderSpec` carries the differences (qkv bias for
Qwen2, per-head q/k RMSNorm for Qwen3, sliding window for Mistral). The module is a
pure function of (params, kv_caches, input_ids, metadata) -> (kv_caches, hidden):
the caches go in and come out so the jitted step can donate them. Layers are
unrolled in Python over per-layer weights (GPU.md: `lax.scan` over stacked weights
doubled the decode step on the H100).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from jllm.layers.attention import AttentionBackend, KVCache, paged_attention
from jllm.layers.attention_metadata import AttentionMetadata
from jllm.layers.norm import RMSNorm
from jllm.layers.rotary import apply_rotary

# Einsum axis letters (tpu-inference's): T tokens, D model dim, N q heads,
# K kv heads, H head dim, F ffn dim, V vocab.


@dataclasses.dataclass(frozen=True)
class DecoderSpec:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    hidden_act: str = "silu"


def _dense(module: nn.Module, name: str, shape: tuple[int, ...], dtype) -> jax.Array:
    return module.param(name, nn.initializers.lecun_normal(), shape, dtype)


def _activation(name: str):
    if name == "silu":
        return jax.nn.silu
    if name in ("gelu_pytorch_tanh", "gelu_tanh"):
        return lambda x: jax.nn.gelu(x, approximate=True)
    if name == "gelu":
        return lambda x: jax.nn.gelu(x, approximate=False)
    raise ValueError(f"hidden_act {name!r} is not supported; supported: 'silu', 'gelu', 'gelu_pytorch_tanh'.")


class Attention(nn.Module):
    spec: DecoderSpec
    dtype: jnp.dtype
    backend: AttentionBackend

    @nn.compact
    def __call__(self, x, cos_sin, cache: KVCache, md: AttentionMetadata):
        s = self.spec
        N, K, H, D = s.num_attention_heads, s.num_key_value_heads, s.head_dim, s.hidden_size
        q = jnp.einsum("TD,DNH->TNH", x, _dense(self, "q_proj", (D, N, H), self.dtype))
        k = jnp.einsum("TD,DKH->TKH", x, _dense(self, "k_proj", (D, K, H), self.dtype))
        v = jnp.einsum("TD,DKH->TKH", x, _dense(self, "v_proj", (D, K, H), self.dtype))
        if s.qkv_bias:
            q = q + self.param("q_bias", nn.initializers.zeros, (N, H), self.dtype)
            k = k + self.param("k_bias", nn.initializers.zeros, (K, H), self.dtype)
            v = v + self.param("v_bias", nn.initializers.zeros, (K, H), self.dtype)
        if s.qk_norm:
            q = RMSNorm(H, s.rms_norm_eps, self.dtype, name="q_norm")(q)
            k = RMSNorm(H, s.rms_norm_eps, self.dtype, name="k_norm")(k)
        q = apply_rotary(q, cos_sin)
        k = apply_rotary(k, cos_sin)
        out, cache = paged_attention(
            q,
            k,
            v,
            cache,
            md,
            scale=H**-0.5,
            backend=self.backend,
            sliding_window=s.sliding_window,
        )
        o = jnp.einsum("TNH,NHD->TD", out, _dense(self, "o_proj", (N, H, D), self.dtype))
        if s.o_bias:
            o = o + self.param("o_bias", nn.initializers.zeros, (D,), self.dtype)
        return o, cache


class MLP(nn.Module):
    spec: DecoderSpec
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
        s = self.spec
        D, F = s.hidden_size, s.intermediate_size
        gate = jnp.einsum("TD,DF->TF", x, _dense(self, "gate_proj", (D, F), self.dtype))
        up = jnp.einsum("TD,DF->TF", x, _dense(self, "up_proj", (D, F), self.dtype))
        if s.mlp_bias:
            gate = gate + self.param("gate_bias", nn.initializers.zeros, (F,), self.dtype)
            up = up + self.param("up_bias", nn.initializers.zeros, (F,), self.dtype)
        out = jnp.einsum(
            "TF,FD->TD", _activation(s.hidden_act)(gate) * up, _dense(self, "down_proj", (F, D), self.dtype)
        )
        if s.mlp_bias:
            out = out + self.param("down_bias", nn.initializers.zeros, (D,), self.dtype)
        return out


class DecoderLayer(nn.Module):
    spec: DecoderSpec
    dtype: jnp.dtype
    backend: AttentionBackend

    @nn.compact
    def __call__(self, x, cos_sin, cache: KVCache, md):
        s = self.spec
        h = RMSNorm(s.hidden_size, s.rms_norm_eps, self.dtype, name="input_layernorm")(x)
        h, cache = Attention(s, self.dtype, self.backend, name="self_attn")(h, cos_sin, cache, md)
        x = x + h
        h = RMSNorm(s.hidden_size, s.rms_norm_eps, self.dtype, name="post_attention_layernorm")(x)
        return x + MLP(s, self.dtype, name="mlp")(h), cache


class LlamaForCausalLM(nn.Module):
    spec: DecoderSpec
    dtype: jnp.dtype
    backend: AttentionBackend = AttentionBackend.REFERENCE

    def setup(self):
        s = self.spec
        self.embed_tokens = self.param(
            "embed_tokens", nn.initializers.normal(0.02), (s.vocab_size, s.hidden_size), self.dtype
        )
        self.layers = [
            DecoderLayer(s, self.dtype, self.backend, name=f"layers_{i}") for i in range(s.num_hidden_layers)
        ]
        self.norm = RMSNorm(s.hidden_size, s.rms_norm_eps, self.dtype, name="norm")
        if not s.tie_word_embeddings:
            self.lm_head = self.param(
                "lm_head", nn.initializers.normal(0.02), (s.hidden_size, s.vocab_size), self.dtype
            )

    def __call__(self, kv_caches, input_ids, cos_sin, md: AttentionMetadata):
        """kv_caches: a KVCache per layer; cos_sin: [T, head_dim] by position.

        Returns (new kv_caches, final hidden states [T, D]).
        """
        x = self.embed_tokens[input_ids]
        new_caches = []
        for layer, cache in zip(self.layers, kv_caches):
            x, cache = layer(x, cos_sin, cache, md)
            new_caches.append(cache)
        return new_caches, self.norm(x)

    def compute_logits(self, hidden):
        """hidden [S, D] -> float32 logits [S, V]."""
        if self.spec.tie_word_embeddings:
            logits = jnp.einsum("SD,VD->SV", hidden, self.embed_tokens, preferred_element_type=jnp.float32)
        else:
            logits = jnp.einsum("SD,DV->SV", hidden, self.lm_head, preferred_element_type=jnp.float32)
        return logits.astype(jnp.float32)
