"""OpenAI's GPT-2 decoder (`GPT2LMHeadModel`: gpt2 ... gpt2-xl, distilgpt2) as a Flax module.

GPT-2 is a pre-LN decoder with learned positions (no offset), LayerNorm with biases,
a fused q/k/v projection and a two-matrix MLP. HF keeps its linear layers as `Conv1D`,
whose weights are stored [in, out], the transpose of nn.Linear's. The module contract
is jllm/models/interface.py's.
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

# Einsum axis letters (tpu-inference's): T tokens, D model dim, C the fused q/k/v index,
# N heads, H head dim, F ffn dim, V vocab.


@dataclasses.dataclass(frozen=True)
class GPT2Spec(ModelShape):
    max_position_embeddings: int
    layer_norm_epsilon: float
    activation_function: str
    scale_attn_weights: bool
    # Layer i's scores are further divided by i + 1 (a stability trick of some GPT-2 trainings).
    scale_attn_by_inverse_layer_idx: bool
    tie_word_embeddings: bool

    def attention_scale(self, layer_idx: int) -> float:
        """HF's GPT2Attention.scaling for layer `layer_idx`."""
        scale = self.head_dim**-0.5 if self.scale_attn_weights else 1.0
        if self.scale_attn_by_inverse_layer_idx:
            scale /= float(layer_idx + 1)
        return scale


class GPT2Attention(nn.Module):
    """Split by heads over the mesh (the fused c_attn by its output heads N, each of q, k
    and v alike; c_proj by input heads: one all-reduce after c_proj)."""

    spec: GPT2Spec
    dtype: jnp.dtype
    backend: AttentionBackend
    scale: float
    mesh: Mesh | None = None

    @nn.compact
    def __call__(self, x, cache: KVCache | None, md: AttentionMetadata):
        s = self.spec
        N, H, D = s.num_attention_heads, s.head_dim, s.hidden_size
        tp = tp_axis_if_divisible(self.mesh, N)
        c_attn = weight_param(self, "c_attn", (D, 3, N, H), self.dtype, (None, None, tp, None))
        qkv = jnp.einsum("TD,DCNH->CTNH", x, c_attn)
        qkv = qkv + bias_param(self, "c_attn_bias", (3, N, H), self.dtype, (None, tp, None))[:, None]
        out, cache = attention(
            qkv[0], qkv[1], qkv[2], cache, md, scale=self.scale, backend=self.backend, causal=True, mesh=self.mesh
        )
        o = jnp.einsum("TNH,NHD->TD", out, weight_param(self, "c_proj", (N, H, D), self.dtype, (tp, None, None)))
        return o + bias_param(self, "c_proj_bias", (D,), self.dtype), cache


class GPT2MLP(nn.Module):
    """Split over the mesh by ffn columns (c_fc) and rows (c_proj): one all-reduce."""

    spec: GPT2Spec
    dtype: jnp.dtype
    mesh: Mesh | None = None

    @nn.compact
    def __call__(self, x):
        s = self.spec
        D, F = s.hidden_size, s.intermediate_size
        tp = tp_axis_if_divisible(self.mesh, F)
        h = jnp.einsum("TD,DF->TF", x, weight_param(self, "c_fc", (D, F), self.dtype, (None, tp))) + bias_param(
            self, "c_fc_bias", (F,), self.dtype, (tp,)
        )
        c_proj = weight_param(self, "c_proj", (F, D), self.dtype, (tp, None))
        h = jnp.einsum("TF,FD->TD", get_act_fn(s.activation_function)(h), c_proj)
        return h + bias_param(self, "c_proj_bias", (D,), self.dtype)


class GPT2Block(nn.Module):
    spec: GPT2Spec
    dtype: jnp.dtype
    backend: AttentionBackend
    layer_idx: int
    mesh: Mesh | None = None

    @nn.compact
    def __call__(self, x, cache: KVCache | None, md: AttentionMetadata):
        s = self.spec
        h = LayerNorm(s.hidden_size, s.layer_norm_epsilon, self.dtype, name="ln_1")(x)
        attn = GPT2Attention(s, self.dtype, self.backend, s.attention_scale(self.layer_idx), self.mesh, name="attn")
        h, cache = attn(h, cache, md)
        x = x + h
        h = LayerNorm(s.hidden_size, s.layer_norm_epsilon, self.dtype, name="ln_2")(x)
        return x + GPT2MLP(s, self.dtype, self.mesh, name="mlp")(h), cache


class GPT2LMHeadModel(nn.Module):
    spec: GPT2Spec
    dtype: jnp.dtype
    backend: AttentionBackend = AttentionBackend.REFERENCE
    # The tensor-parallel mesh (None: one device).
    mesh: Mesh | None = None

    def setup(self):
        s = self.spec
        # Vocabulary-parallel embedding and LM head: the logits come out split by vocabulary
        # and the runner gathers them whole for sampling.
        vocab = tp_axis_if_divisible(self.mesh, s.vocab_size)
        self.wte = embedding_param(self, "wte", (s.vocab_size, s.hidden_size), self.dtype, (vocab, None))
        self.wpe = embedding_param(self, "wpe", (s.max_position_embeddings, s.hidden_size), self.dtype)
        self.h = [
            GPT2Block(s, self.dtype, self.backend, i, self.mesh, name=f"h_{i}") for i in range(s.num_hidden_layers)
        ]
        self.ln_f = LayerNorm(s.hidden_size, s.layer_norm_epsilon, self.dtype, name="ln_f")
        if not s.tie_word_embeddings:
            self.lm_head = embedding_param(self, "lm_head", (s.hidden_size, s.vocab_size), self.dtype, (None, vocab))

    def __call__(self, kv_caches, input_ids, md: AttentionMetadata, constants, token_type_ids=None):
        """kv_caches: a KVCache per layer (or None each). Returns (new kv_caches, hidden [T, D])."""
        x = embed_tokens(self.wte, input_ids, self.mesh) + self.wpe[md.positions]
        new_caches = []
        for block, cache in zip(self.h, kv_caches):
            x, cache = block(x, cache, md)
            new_caches.append(cache)
        return new_caches, self.ln_f(x)

    def compute_logits(self, hidden):
        """hidden [S, D] -> float32 logits [S, V]."""
        if self.spec.tie_word_embeddings:
            logits = jnp.einsum("SD,VD->SV", hidden, self.wte, preferred_element_type=jnp.float32)
        else:
            logits = jnp.einsum("SD,DV->SV", hidden, self.lm_head, preferred_element_type=jnp.float32)
        return logits.astype(jnp.float32)


def build_spec(cfg, head: ModelHead) -> GPT2Spec:
    if head != ModelHead.LM:
        raise ValueError(f"GPT2LMHeadModel only generates text; it has no {head.value!r} head in jllm.")
    # reorder_and_upcast_attn only moves HF's scores and softmax to float32 (and only in
    # its eager path); jllm's attention always computes them in float32, so it is honoured.
    hidden, num_heads = cfg.n_embd, cfg.n_head
    return GPT2Spec(
        vocab_size=cfg.vocab_size,
        hidden_size=hidden,
        intermediate_size=getattr(cfg, "n_inner", None) or 4 * hidden,
        num_hidden_layers=cfg.n_layer,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        head_dim=hidden // num_heads,
        max_position_embeddings=cfg.n_positions,
        layer_norm_epsilon=cfg.layer_norm_epsilon,
        activation_function=getattr(cfg, "activation_function", "gelu_new"),
        scale_attn_weights=bool(getattr(cfg, "scale_attn_weights", True)),
        scale_attn_by_inverse_layer_idx=bool(getattr(cfg, "scale_attn_by_inverse_layer_idx", False)),
        tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", True)),
    )


def _norm_map(hf_name: str, path: tuple[str, ...]) -> dict:
    return {
        hf_name + ".weight": (path + ("weight",), None),
        hf_name + ".bias": (path + ("bias",), None),
    }


def _layer_map(spec: GPT2Spec, i: int) -> dict:
    N, H, D = spec.num_attention_heads, spec.head_dim, spec.hidden_size
    pre = f"transformer.h.{i}."
    block = (f"h_{i}",)
    attn, mlp = block + ("attn",), block + ("mlp",)
    return {
        # c_attn's output columns are q, k, v in turn, each heads-major.
        pre + "attn.c_attn.weight": (attn + ("c_attn",), lambda w: w.reshape(D, 3, N, H)),
        pre + "attn.c_attn.bias": (attn + ("c_attn_bias",), lambda b: b.reshape(3, N, H)),
        pre + "attn.c_proj.weight": (attn + ("c_proj",), lambda w: w.reshape(N, H, D)),
        pre + "attn.c_proj.bias": (attn + ("c_proj_bias",), None),
        pre + "mlp.c_fc.weight": (mlp + ("c_fc",), None),
        pre + "mlp.c_fc.bias": (mlp + ("c_fc_bias",), None),
        pre + "mlp.c_proj.weight": (mlp + ("c_proj",), None),
        pre + "mlp.c_proj.bias": (mlp + ("c_proj_bias",), None),
        **_norm_map(pre + "ln_1", block + ("ln_1",)),
        **_norm_map(pre + "ln_2", block + ("ln_2",)),
    }


def hf_name_map(spec: GPT2Spec) -> dict:
    """HF tensor name -> (param path, host-side transform or None). Conv1D weights are
    already [in, out], so they are only split into heads, at load. OpenAI's own gpt2
    files lack the `transformer.` prefix; the loader retries without it."""
    m = {
        "transformer.wte.weight": (("wte",), None),
        "transformer.wpe.weight": (("wpe",), None),
        **_norm_map("transformer.ln_f", ("ln_f",)),
    }
    if not spec.tie_word_embeddings:
        m["lm_head.weight"] = (("lm_head",), np.transpose)
    for i in range(spec.num_hidden_layers):
        m.update(_layer_map(spec, i))
    return m


FAMILY = ModelFamily(module=GPT2LMHeadModel, build_spec=build_spec, hf_name_map=hf_name_map)
