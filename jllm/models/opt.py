"""Meta's OPT decoder (`OPTForCausalLM`: opt-125m ... opt-66b, opt-350m's variant) as a Flax module.

OPT differs from the Llama family in its learned positions (HF's table is offset by
2: position p reads row p + 2), LayerNorm with biases everywhere, a two-matrix MLP
(fc1, activation, fc2), and, in opt-350m, post-LN layers and a word-embedding width
below the model's (`project_in` / `project_out` around the decoder). The module
contract is jllm/models/interface.py's.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jllm.distributed.mesh import tp_axis_if_divisible
from jllm.layers.activation import get_act_fn
from jllm.layers.attention import AttentionBackend, KVCache, attention
from jllm.layers.attention_metadata import AttentionMetadata
from jllm.layers.norm import LayerNorm
from jllm.layers.params import bias_param, embedding_param, weight_param
from jllm.layers.vocab_parallel_embedding import embed_tokens
from jllm.models.interface import ModelFamily, ModelHead, ModelShape

# Einsum axis letters (tpu-inference's): T tokens, D model dim, N heads, H head dim,
# F ffn dim, W word-embedding dim, V vocab.

# HF's OPTLearnedPositionalEmbedding: fairseq reserved the table's first two rows.
POSITION_OFFSET = 2
# OPT's nn.LayerNorm(hidden_size) keeps torch's default epsilon.
LAYER_NORM_EPS = 1e-5


@dataclasses.dataclass(frozen=True)
class OPTSpec(ModelShape):
    word_embed_proj_dim: int
    max_position_embeddings: int
    # Pre-LN layers (every OPT but opt-350m, which normalises after each residual add).
    do_layer_norm_before: bool
    # The decoder's last LayerNorm: pre-LN checkpoints have it unless built without it.
    final_layer_norm: bool
    enable_bias: bool
    activation_function: str
    tie_word_embeddings: bool

    @property
    def projects_embeddings(self) -> bool:
        return self.word_embed_proj_dim != self.hidden_size


class OPTAttention(nn.Module):
    """Split by heads over the mesh (q/k/v by output heads, out_proj by input heads: one
    all-reduce after out_proj)."""

    spec: OPTSpec
    dtype: jnp.dtype
    backend: AttentionBackend
    mesh: Mesh | None = None

    @nn.compact
    def __call__(self, x, cache: KVCache | None, md: AttentionMetadata):
        s = self.spec
        N, H, D = s.num_attention_heads, s.head_dim, s.hidden_size
        tp = tp_axis_if_divisible(self.mesh, N)
        heads_out, heads_in = (None, tp, None), (tp, None, None)
        q = jnp.einsum("TD,DNH->TNH", x, weight_param(self, "q_proj", (D, N, H), self.dtype, heads_out))
        k = jnp.einsum("TD,DNH->TNH", x, weight_param(self, "k_proj", (D, N, H), self.dtype, heads_out))
        v = jnp.einsum("TD,DNH->TNH", x, weight_param(self, "v_proj", (D, N, H), self.dtype, heads_out))
        if s.enable_bias:
            q = q + bias_param(self, "q_bias", (N, H), self.dtype, (tp, None))
            k = k + bias_param(self, "k_bias", (N, H), self.dtype, (tp, None))
            v = v + bias_param(self, "v_bias", (N, H), self.dtype, (tp, None))
        # HF scales q (bias included) before the product; the same scores, scaled inside.
        out, cache = attention(q, k, v, cache, md, scale=H**-0.5, backend=self.backend, causal=True, mesh=self.mesh)
        o = jnp.einsum("TNH,NHD->TD", out, weight_param(self, "out_proj", (N, H, D), self.dtype, heads_in))
        if s.enable_bias:
            o = o + bias_param(self, "out_bias", (D,), self.dtype)
        return o, cache


class OPTDecoderLayer(nn.Module):
    """The MLP is split over the mesh by ffn columns (fc1) and rows (fc2): one all-reduce."""

    spec: OPTSpec
    dtype: jnp.dtype
    backend: AttentionBackend
    mesh: Mesh | None = None

    @nn.compact
    def __call__(self, x, cache: KVCache | None, md: AttentionMetadata):
        s = self.spec
        D, F = s.hidden_size, s.intermediate_size
        tp = tp_axis_if_divisible(self.mesh, F)
        attn_norm = LayerNorm(D, LAYER_NORM_EPS, self.dtype, name="self_attn_layer_norm")
        mlp_norm = LayerNorm(D, LAYER_NORM_EPS, self.dtype, name="final_layer_norm")
        pre_ln = s.do_layer_norm_before

        attn = OPTAttention(s, self.dtype, self.backend, self.mesh, name="self_attn")
        h, cache = attn(attn_norm(x) if pre_ln else x, cache, md)
        x = x + h
        if not pre_ln:
            x = attn_norm(x)

        fc1 = weight_param(self, "fc1", (D, F), self.dtype, (None, tp))
        h = jnp.einsum("TD,DF->TF", mlp_norm(x) if pre_ln else x, fc1)
        if s.enable_bias:
            h = h + bias_param(self, "fc1_bias", (F,), self.dtype, (tp,))
        fc2 = weight_param(self, "fc2", (F, D), self.dtype, (tp, None))
        h = jnp.einsum("TF,FD->TD", get_act_fn(s.activation_function)(h), fc2)
        if s.enable_bias:
            h = h + bias_param(self, "fc2_bias", (D,), self.dtype)
        x = x + h
        if not pre_ln:
            x = mlp_norm(x)
        return x, cache


class OPTForCausalLM(nn.Module):
    spec: OPTSpec
    dtype: jnp.dtype
    backend: AttentionBackend = AttentionBackend.REFERENCE
    # The tensor-parallel mesh (None: one device).
    mesh: Mesh | None = None

    def setup(self):
        s = self.spec
        D, W = s.hidden_size, s.word_embed_proj_dim
        # Vocabulary-parallel embedding and LM head: the logits come out split by vocabulary
        # and the runner gathers them whole for sampling.
        vocab = tp_axis_if_divisible(self.mesh, s.vocab_size)
        self.embed_tokens = embedding_param(self, "embed_tokens", (s.vocab_size, W), self.dtype, (vocab, None))
        self.embed_positions = embedding_param(
            self, "embed_positions", (s.max_position_embeddings + POSITION_OFFSET, D), self.dtype
        )
        if s.projects_embeddings:
            self.project_in = weight_param(self, "project_in", (W, D), self.dtype)
            self.project_out = weight_param(self, "project_out", (D, W), self.dtype)
        self.layers = [
            OPTDecoderLayer(s, self.dtype, self.backend, self.mesh, name=f"layers_{i}")
            for i in range(s.num_hidden_layers)
        ]
        if s.final_layer_norm:
            self.final_layer_norm = LayerNorm(D, LAYER_NORM_EPS, self.dtype, name="final_layer_norm")
        if not s.tie_word_embeddings:
            self.lm_head = embedding_param(self, "lm_head", (W, s.vocab_size), self.dtype, (None, vocab))

    def __call__(self, kv_caches, input_ids, md: AttentionMetadata, constants, token_type_ids=None):
        """kv_caches: a KVCache per layer (or None each). Returns (new kv_caches, hidden [T, W])."""
        s = self.spec
        x = embed_tokens(self.embed_tokens, input_ids, self.mesh)
        if s.projects_embeddings:
            x = jnp.einsum("TW,WD->TD", x, self.project_in)
        x = x + self.embed_positions[md.positions + POSITION_OFFSET]
        new_caches = []
        for layer, cache in zip(self.layers, kv_caches):
            x, cache = layer(x, cache, md)
            new_caches.append(cache)
        if s.final_layer_norm:
            x = self.final_layer_norm(x)
        if s.projects_embeddings:
            x = jnp.einsum("TD,DW->TW", x, self.project_out)
        return new_caches, x

    def compute_logits(self, hidden):
        """hidden [S, W] -> float32 logits [S, V]."""
        if self.spec.tie_word_embeddings:
            logits = jnp.einsum("SW,VW->SV", hidden, self.embed_tokens, preferred_element_type=jnp.float32)
        else:
            logits = jnp.einsum("SW,WV->SV", hidden, self.lm_head, preferred_element_type=jnp.float32)
        return logits.astype(jnp.float32)


def build_spec(cfg, head: ModelHead) -> OPTSpec:
    if head != ModelHead.LM:
        raise ValueError(f"OPTForCausalLM only generates text; it has no {head.value!r} head in jllm.")
    if not getattr(cfg, "layer_norm_elementwise_affine", True):
        raise ValueError("OPT with layer_norm_elementwise_affine=False (LayerNorms without weights) is not supported.")
    do_layer_norm_before = bool(getattr(cfg, "do_layer_norm_before", True))
    num_heads = cfg.num_attention_heads
    return OPTSpec(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        head_dim=cfg.hidden_size // num_heads,
        word_embed_proj_dim=getattr(cfg, "word_embed_proj_dim", None) or cfg.hidden_size,
        max_position_embeddings=cfg.max_position_embeddings,
        do_layer_norm_before=do_layer_norm_before,
        final_layer_norm=do_layer_norm_before and not getattr(cfg, "_remove_final_layer_norm", False),
        enable_bias=bool(getattr(cfg, "enable_bias", True)),
        activation_function=getattr(cfg, "activation_function", "relu"),
        tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", True)),
    )


def _norm_map(hf_name: str, path: tuple[str, ...]) -> dict:
    return {
        hf_name + ".weight": (path + ("weight",), None),
        hf_name + ".bias": (path + ("bias",), None),
    }


def _layer_map(spec: OPTSpec, i: int) -> dict:
    N, H, D = spec.num_attention_heads, spec.head_dim, spec.hidden_size
    pre = f"model.decoder.layers.{i}."
    layer = (f"layers_{i}",)
    at = layer + ("self_attn",)
    m = {
        pre + "self_attn.q_proj.weight": (at + ("q_proj",), lambda w: w.T.reshape(D, N, H)),
        pre + "self_attn.k_proj.weight": (at + ("k_proj",), lambda w: w.T.reshape(D, N, H)),
        pre + "self_attn.v_proj.weight": (at + ("v_proj",), lambda w: w.T.reshape(D, N, H)),
        pre + "self_attn.out_proj.weight": (at + ("out_proj",), lambda w: w.T.reshape(N, H, D)),
        pre + "fc1.weight": (layer + ("fc1",), np.transpose),
        pre + "fc2.weight": (layer + ("fc2",), np.transpose),
        **_norm_map(pre + "self_attn_layer_norm", layer + ("self_attn_layer_norm",)),
        **_norm_map(pre + "final_layer_norm", layer + ("final_layer_norm",)),
    }
    if spec.enable_bias:
        for name in ("q", "k", "v"):
            m[pre + f"self_attn.{name}_proj.bias"] = (at + (f"{name}_bias",), lambda b: b.reshape(N, H))
        m[pre + "self_attn.out_proj.bias"] = (at + ("out_bias",), None)
        m[pre + "fc1.bias"] = (layer + ("fc1_bias",), None)
        m[pre + "fc2.bias"] = (layer + ("fc2_bias",), None)
    return m


def hf_name_map(spec: OPTSpec) -> dict:
    """HF tensor name -> (param path, host-side transform or None). HF's Linear weights
    are [out, in]; each is transposed (and split into heads) once, at load. Checkpoints
    saved from OPTModel (opt-125m's own files) lack the `model.` prefix; the loader
    retries without it."""
    m = {
        "model.decoder.embed_tokens.weight": (("embed_tokens",), None),
        "model.decoder.embed_positions.weight": (("embed_positions",), None),
    }
    if spec.projects_embeddings:
        m["model.decoder.project_in.weight"] = (("project_in",), np.transpose)
        m["model.decoder.project_out.weight"] = (("project_out",), np.transpose)
    if spec.final_layer_norm:
        m.update(_norm_map("model.decoder.final_layer_norm", ("final_layer_norm",)))
    if not spec.tie_word_embeddings:
        m["lm_head.weight"] = (("lm_head",), np.transpose)
    for i in range(spec.num_hidden_layers):
        m.update(_layer_map(spec, i))
    return m


FAMILY = ModelFamily(module=OPTForCausalLM, build_spec=build_spec, hf_name_map=hf_name_map)
