"""The Llama-family decoder (Llama 2/3.x, SmolLM2, Mistral, Qwen2, Qwen3) as a Flax module.

One definition serves the family; `DecoderSpec` carries the differences (qkv bias for
Qwen2, per-head q/k RMSNorm for Qwen3, sliding window for Mistral) and the head: the LM
head, none (last-token embeddings, as Qwen3-Embedding is used), a `score` classifier
(`*ForSequenceClassification`) or Qwen2ForRewardModel's two-layer `score` MLP. The module
is a pure function of (params, kv_caches, input_ids, metadata) -> (kv_caches, hidden):
the caches go in and come out so the jitted step can donate them. Layers are unrolled in
Python over per-layer weights (GPU.md: `lax.scan` over stacked weights doubled the decode
step on the H100). The module contract is jllm/models/interface.py's.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

import numpy as np
from jax.sharding import Mesh

from jllm.distributed.mesh import num_kv_cache_heads, tp_axis_if_divisible
from jllm.layers.activation import get_act_fn
from jllm.layers.attention import AttentionBackend, KVCache, attention
from jllm.layers.attention_metadata import AttentionMetadata
from jllm.layers.linear import linear
from jllm.layers.norm import RMSNorm
from jllm.layers.params import bias_param, embedding_param, weight_param
from jllm.layers.quantization import QuantizationConfig
from jllm.layers.rotary import apply_rotary, cos_sin_cache, rope_parameters
from jllm.layers.vocab_parallel_embedding import embed_tokens
from jllm.models.interface import ModelFamily, ModelHead, ModelShape

# Einsum axis letters (tpu-inference's): T tokens, D model dim, N q heads,
# K kv heads, H head dim, F ffn dim, V vocab.


@dataclasses.dataclass(frozen=True)
class DecoderSpec(ModelShape):
    rms_norm_eps: float
    tie_word_embeddings: bool
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    hidden_act: str = "silu"
    head: ModelHead = ModelHead.LM
    # Outputs of the classify / reward head.
    num_labels: int = 0
    # AWQ / GPTQ: the projections (not embeddings, norms or heads) stay packed on the device.
    quant_config: QuantizationConfig | None = None


def _projector(module: nn.Module, spec: DecoderSpec):
    """`linear` bound to the module: float weights, or the spec's quantized ones, which the
    Pallas kernel multiplies where attention runs the kernels too."""

    def proj(name, equation, x, shape, sharding, num_in_dims=1):
        return linear(
            module,
            name,
            equation,
            x,
            shape,
            module.dtype,
            sharding,
            num_in_dims=num_in_dims,
            quant_config=spec.quant_config,
            use_kernel=module.backend != AttentionBackend.REFERENCE,
            mesh=module.mesh,
        )

    return proj


class Attention(nn.Module):
    """Split by heads over the mesh (q/k/v by output heads, o_proj by input heads: one
    all-reduce after o_proj). With fewer kv heads than devices, k/v are computed whole on
    every device and each kv head repeated onto the devices whose query heads read it."""

    spec: DecoderSpec
    dtype: jnp.dtype
    backend: AttentionBackend
    mesh: Mesh | None = None

    @nn.compact
    def __call__(self, x, cos_sin, cache: KVCache | None, md: AttentionMetadata):
        s = self.spec
        N, K, H, D = s.num_attention_heads, s.num_key_value_heads, s.head_dim, s.hidden_size
        tp = tp_axis_if_divisible(self.mesh, N)
        kv = tp_axis_if_divisible(self.mesh, K)
        proj = _projector(self, s)
        q = proj("q_proj", "TD,DNH->TNH", x, (D, N, H), (None, tp, None))
        k = proj("k_proj", "TD,DKH->TKH", x, (D, K, H), (None, kv, None))
        v = proj("v_proj", "TD,DKH->TKH", x, (D, K, H), (None, kv, None))
        if s.qkv_bias:
            q = q + bias_param(self, "q_bias", (N, H), self.dtype, (tp, None))
            k = k + bias_param(self, "k_bias", (K, H), self.dtype, (kv, None))
            v = v + bias_param(self, "v_bias", (K, H), self.dtype, (kv, None))
        if s.qk_norm:
            q = RMSNorm(H, s.rms_norm_eps, self.dtype, name="q_norm")(q)
            k = RMSNorm(H, s.rms_norm_eps, self.dtype, name="k_norm")(k)
        q = apply_rotary(q, cos_sin)
        k = apply_rotary(k, cos_sin)
        replicas = num_kv_cache_heads(K, self.mesh) // K
        if replicas > 1:
            k, v = jnp.repeat(k, replicas, axis=1), jnp.repeat(v, replicas, axis=1)
        out, cache = attention(
            q,
            k,
            v,
            cache,
            md,
            scale=H**-0.5,
            backend=self.backend,
            causal=True,
            sliding_window=s.sliding_window,
            mesh=self.mesh,
        )
        o = proj("o_proj", "TNH,NHD->TD", out, (N, H, D), (tp, None, None), num_in_dims=2)
        if s.o_bias:
            o = o + bias_param(self, "o_bias", (D,), self.dtype)
        return o, cache


class MLP(nn.Module):
    """Split over the mesh by ffn columns (gate/up) and rows (down): one all-reduce."""

    spec: DecoderSpec
    dtype: jnp.dtype
    backend: AttentionBackend
    mesh: Mesh | None = None

    @nn.compact
    def __call__(self, x):
        s = self.spec
        D, F = s.hidden_size, s.intermediate_size
        tp = tp_axis_if_divisible(self.mesh, F)
        proj = _projector(self, s)
        gate = proj("gate_proj", "TD,DF->TF", x, (D, F), (None, tp))
        up = proj("up_proj", "TD,DF->TF", x, (D, F), (None, tp))
        if s.mlp_bias:
            gate = gate + bias_param(self, "gate_bias", (F,), self.dtype, (tp,))
            up = up + bias_param(self, "up_bias", (F,), self.dtype, (tp,))
        out = proj("down_proj", "TF,FD->TD", get_act_fn(s.hidden_act)(gate) * up, (F, D), (tp, None))
        if s.mlp_bias:
            out = out + bias_param(self, "down_bias", (D,), self.dtype)
        return out


class DecoderLayer(nn.Module):
    spec: DecoderSpec
    dtype: jnp.dtype
    backend: AttentionBackend
    mesh: Mesh | None = None

    @nn.compact
    def __call__(self, x, cos_sin, cache: KVCache, md):
        s = self.spec
        h = RMSNorm(s.hidden_size, s.rms_norm_eps, self.dtype, name="input_layernorm")(x)
        h, cache = Attention(s, self.dtype, self.backend, self.mesh, name="self_attn")(h, cos_sin, cache, md)
        x = x + h
        h = RMSNorm(s.hidden_size, s.rms_norm_eps, self.dtype, name="post_attention_layernorm")(x)
        return x + MLP(s, self.dtype, self.backend, self.mesh, name="mlp")(h), cache


class LlamaForCausalLM(nn.Module):
    spec: DecoderSpec
    dtype: jnp.dtype
    backend: AttentionBackend = AttentionBackend.REFERENCE
    # The tensor-parallel mesh the parameters are split over (None: one device).
    mesh: Mesh | None = None

    def setup(self):
        s = self.spec
        # Vocabulary-parallel embedding and LM head: the logits come out split by vocabulary
        # and the runner gathers them whole for sampling.
        vocab = tp_axis_if_divisible(self.mesh, s.vocab_size)
        self.embed_tokens = embedding_param(
            self, "embed_tokens", (s.vocab_size, s.hidden_size), self.dtype, (vocab, None)
        )
        self.layers = [
            DecoderLayer(s, self.dtype, self.backend, self.mesh, name=f"layers_{i}") for i in range(s.num_hidden_layers)
        ]
        self.norm = RMSNorm(s.hidden_size, s.rms_norm_eps, self.dtype, name="norm")
        if s.head == ModelHead.LM and not s.tie_word_embeddings:
            self.lm_head = embedding_param(self, "lm_head", (s.hidden_size, s.vocab_size), self.dtype, (None, vocab))
        elif s.head == ModelHead.CLASSIFY:
            self.score = weight_param(self, "score", (s.hidden_size, s.num_labels), self.dtype)
        elif s.head == ModelHead.REWARD:
            D = s.hidden_size
            self.score_0 = weight_param(self, "score_0", (D, D), self.dtype)
            self.score_0_bias = self.param("score_0_bias", nn.initializers.zeros, (D,), self.dtype)
            self.score_2 = weight_param(self, "score_2", (D, s.num_labels), self.dtype)
            self.score_2_bias = self.param("score_2_bias", nn.initializers.zeros, (s.num_labels,), self.dtype)

    def __call__(self, kv_caches, input_ids, md: AttentionMetadata, constants, token_type_ids=None):
        """kv_caches: a KVCache per layer (or None each: no cache kept); constants["cos_sin"]:
        [max_model_len, head_dim], gathered by position.

        Returns (new kv_caches, final hidden states [T, D]).
        """
        cos_sin = constants["cos_sin"][md.positions]
        x = embed_tokens(self.embed_tokens, input_ids, self.mesh)
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

    def pool_head(self, pooled):
        """pooled [S, D] -> float32 [S, out]: the embedding itself, or the head's logits."""
        head = self.spec.head
        if head == ModelHead.CLASSIFY:
            return jnp.einsum("SD,DL->SL", pooled, self.score, preferred_element_type=jnp.float32)
        if head == ModelHead.REWARD:
            h = jax.nn.relu(pooled @ self.score_0 + self.score_0_bias)
            return jnp.einsum(
                "SD,DL->SL", h, self.score_2, preferred_element_type=jnp.float32
            ) + self.score_2_bias.astype(jnp.float32)
        return pooled.astype(jnp.float32)


def build_spec(cfg, head: ModelHead) -> DecoderSpec:
    """The family's spec from an HF config: its model_type picks the variant."""
    model_type = getattr(cfg, "model_type", "llama")
    variant: dict = {}
    attention_bias = bool(getattr(cfg, "attention_bias", False))
    window = cfg.sliding_window if getattr(cfg, "use_sliding_window", False) else None
    if model_type == "mistral":
        variant = dict(sliding_window=getattr(cfg, "sliding_window", None))
    elif model_type == "qwen2":
        variant = dict(qkv_bias=True, sliding_window=window)
    elif model_type == "qwen3":
        variant = dict(qkv_bias=attention_bias, o_bias=attention_bias, qk_norm=True, sliding_window=window)
    else:
        variant = dict(qkv_bias=attention_bias, o_bias=attention_bias, mlp_bias=bool(getattr(cfg, "mlp_bias", False)))
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return DecoderSpec(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
        head_dim=head_dim,
        rms_norm_eps=cfg.rms_norm_eps,
        tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
        hidden_act=getattr(cfg, "hidden_act", "silu"),
        head=head,
        num_labels=int(getattr(cfg, "num_labels", 0) or 0) if head in (ModelHead.CLASSIFY, ModelHead.REWARD) else 0,
        **variant,
    )


def _layer_map(spec: DecoderSpec, i: int) -> dict[str, tuple[tuple[str, ...], callable]]:
    N, K, H, D = spec.num_attention_heads, spec.num_key_value_heads, spec.head_dim, spec.hidden_size
    pre = f"model.layers.{i}."
    at = (f"layers_{i}", "self_attn")
    mlp = (f"layers_{i}", "mlp")
    heads_in = lambda n: lambda w: w.T.reshape(D, n, H)  # noqa: E731
    projections = {
        "self_attn.q_proj": (at, heads_in(N)),
        "self_attn.k_proj": (at, heads_in(K)),
        "self_attn.v_proj": (at, heads_in(K)),
        "self_attn.o_proj": (at, lambda w: w.T.reshape(N, H, D)),
        "mlp.gate_proj": (mlp, np.transpose),
        "mlp.up_proj": (mlp, np.transpose),
        "mlp.down_proj": (mlp, np.transpose),
    }
    m = {}
    for hf_name, (module_path, transform) in projections.items():
        path = module_path + (hf_name.rpartition(".")[2],)
        if spec.quant_config is None:
            m[pre + hf_name + ".weight"] = (path, transform)
        else:
            # Converted to the device layout before the map (QuantizationConfig.convert_checkpoint).
            for tensor in spec.quant_config.device_tensor_names():
                m[pre + hf_name + "." + tensor] = (path + (tensor,), None)
    m |= {
        pre + "input_layernorm.weight": ((f"layers_{i}", "input_layernorm", "weight"), None),
        pre + "post_attention_layernorm.weight": ((f"layers_{i}", "post_attention_layernorm", "weight"), None),
    }
    if spec.qkv_bias:
        m[pre + "self_attn.q_proj.bias"] = (at + ("q_bias",), lambda b: b.reshape(N, H))
        m[pre + "self_attn.k_proj.bias"] = (at + ("k_bias",), lambda b: b.reshape(K, H))
        m[pre + "self_attn.v_proj.bias"] = (at + ("v_bias",), lambda b: b.reshape(K, H))
    if spec.o_bias:
        m[pre + "self_attn.o_proj.bias"] = (at + ("o_bias",), None)
    if spec.mlp_bias:
        for name in ("gate", "up", "down"):
            m[pre + f"mlp.{name}_proj.bias"] = (mlp + (f"{name}_bias",), None)
    if spec.qk_norm:
        m[pre + "self_attn.q_norm.weight"] = (at + ("q_norm", "weight"), None)
        m[pre + "self_attn.k_norm.weight"] = (at + ("k_norm", "weight"), None)
    return m


def hf_name_map(spec: DecoderSpec) -> dict[str, tuple[tuple[str, ...], callable]]:
    """HF tensor name -> (param path, host-side transform or None). HF stores linear
    weights as [out, in]; the einsums here take [in, heads, head_dim] (projections into
    heads) or [heads, head_dim, out] (o_proj), so each is transposed once, at load."""
    m = {
        "model.embed_tokens.weight": (("embed_tokens",), None),
        "model.norm.weight": (("norm", "weight"), None),
    }
    if spec.head == ModelHead.LM and not spec.tie_word_embeddings:
        m["lm_head.weight"] = (("lm_head",), np.transpose)
    elif spec.head == ModelHead.CLASSIFY:
        m["score.weight"] = (("score",), np.transpose)
    elif spec.head == ModelHead.REWARD:
        m["score.0.weight"] = (("score_0",), np.transpose)
        m["score.0.bias"] = (("score_0_bias",), None)
        m["score.2.weight"] = (("score_2",), np.transpose)
        m["score.2.bias"] = (("score_2_bias",), None)
    for i in range(spec.num_hidden_layers):
        m.update(_layer_map(spec, i))
    return m


def constants(spec: DecoderSpec, hf_config, max_model_len: int) -> dict:
    """The rotary cos/sin of every position up to max_model_len."""
    table = cos_sin_cache(
        spec.head_dim,
        rope_parameters(hf_config),
        getattr(hf_config, "max_position_embeddings", max_model_len),
        max_model_len,
    )
    return {"cos_sin": table}


FAMILY = ModelFamily(module=LlamaForCausalLM, build_spec=build_spec, hf_name_map=hf_name_map, constants=constants)
