"""The BERT encoder family (BERT, XLM-RoBERTa) as a Flax module: embeddings, classifiers,
cross-encoder scores.

BERT and XLM-R share the architecture: word + absolute position + token type embeddings
and a LayerNorm, then post-LN layers (attention, then the MLP, each added to its input
before its LayerNorm). `EncoderSpec.roberta` carries their two differences: XLM-R's
positions count from past its padding index (HF's create_position_ids_from_input_ids),
and its classifier is RobertaClassificationHead (dense, tanh, out_proj) where BERT's is
its pooler (dense, tanh) then a linear `classifier`. Attention is bidirectional within
each sequence and keeps no KV cache. The module contract is jllm/models/interface.py's.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jllm.distributed.mesh import tp_axis_if_divisible
from jllm.layers.activation import get_act_fn
from jllm.layers.attention import AttentionBackend, attention
from jllm.layers.attention_metadata import AttentionMetadata
from jllm.layers.norm import LayerNorm
from jllm.layers.params import bias_param, embedding_param, weight_param
from jllm.layers.vocab_parallel_embedding import embed_tokens
from jllm.models.interface import ModelFamily, ModelHead, ModelShape

# Einsum axis letters (tpu-inference's): T tokens, D model dim, N heads, H head dim,
# F ffn dim, S sequences, L labels.

_ROBERTA_TYPES = ("roberta", "xlm-roberta")


@dataclasses.dataclass(frozen=True)
class EncoderSpec(ModelShape):
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float
    hidden_act: str = "gelu"
    # XLM-R / RoBERTa: positions start past pad_token_id, and the RoBERTa classifier head.
    roberta: bool = False
    pad_token_id: int = 0
    head: ModelHead = ModelHead.EMBED
    # Outputs of the classify head.
    num_labels: int = 0


def roberta_positions(input_ids: jax.Array, positions: jax.Array, pad_token_id: int) -> jax.Array:
    """HF's create_position_ids_from_input_ids on the flat token axis: a sequence's
    non-padding tokens count from pad_token_id + 1, and padding tokens sit at pad_token_id.
    positions [T] is each token's index within its sequence, so t - positions[t] is where
    the sequence starts."""
    real = (input_ids != pad_token_id).astype(jnp.int32)
    counted = jnp.cumsum(real)
    start = jnp.arange(input_ids.shape[0], dtype=jnp.int32) - positions
    before = counted[start] - real[start]
    return jnp.where(real == 1, pad_token_id + counted - before, pad_token_id)


class BertEmbedding(nn.Module):
    """Word embeddings split by vocabulary over the mesh (where it divides); the small
    position and token type tables whole on every device."""

    spec: EncoderSpec
    dtype: jnp.dtype
    mesh: Mesh | None = None

    @nn.compact
    def __call__(self, input_ids, positions, token_type_ids):
        s = self.spec
        D = s.hidden_size
        vocab = tp_axis_if_divisible(self.mesh, s.vocab_size)
        words = embedding_param(self, "word_embeddings", (s.vocab_size, D), self.dtype, (vocab, None))
        table = embedding_param(self, "position_embeddings", (s.max_position_embeddings, D), self.dtype)
        types = embedding_param(self, "token_type_embeddings", (s.type_vocab_size, D), self.dtype)
        if s.roberta:
            positions = roberta_positions(input_ids, positions, s.pad_token_id)
        x = embed_tokens(words, input_ids, self.mesh) + types[token_type_ids] + table[positions]
        return LayerNorm(D, s.layer_norm_eps, self.dtype, name="LayerNorm")(x)


class BertAttention(nn.Module):
    """Split by heads over the mesh (query/key/value by output heads, the output dense by
    input heads: one all-reduce before the LayerNorm)."""

    spec: EncoderSpec
    dtype: jnp.dtype
    backend: AttentionBackend
    mesh: Mesh | None = None

    @nn.compact
    def __call__(self, x, md: AttentionMetadata):
        s = self.spec
        N, H, D = s.num_attention_heads, s.head_dim, s.hidden_size
        dt = self.dtype
        tp = tp_axis_if_divisible(self.mesh, N)

        def project(name):
            w = weight_param(self, name, (D, N, H), dt, (None, tp, None))
            return jnp.einsum("TD,DNH->TNH", x, w) + bias_param(self, f"{name}_bias", (N, H), dt, (tp, None))

        q, k, v = project("query"), project("key"), project("value")
        out, _ = attention(q, k, v, None, md, scale=H**-0.5, backend=self.backend, causal=False, mesh=self.mesh)
        o = jnp.einsum("TNH,NHD->TD", out, weight_param(self, "dense", (N, H, D), dt, (tp, None, None))) + bias_param(
            self, "dense_bias", (D,), dt
        )
        return LayerNorm(D, s.layer_norm_eps, dt, name="LayerNorm")(o + x)


class BertLayer(nn.Module):
    """The MLP is split over the mesh by ffn columns (intermediate) and rows (output):
    one all-reduce."""

    spec: EncoderSpec
    dtype: jnp.dtype
    backend: AttentionBackend
    mesh: Mesh | None = None

    @nn.compact
    def __call__(self, x, md: AttentionMetadata):
        s = self.spec
        D, F = s.hidden_size, s.intermediate_size
        dt = self.dtype
        tp = tp_axis_if_divisible(self.mesh, F)
        x = BertAttention(s, dt, self.backend, self.mesh, name="attention")(x, md)
        h = jnp.einsum("TD,DF->TF", x, weight_param(self, "intermediate", (D, F), dt, (None, tp)))
        h = get_act_fn(s.hidden_act)(h + bias_param(self, "intermediate_bias", (F,), dt, (tp,)))
        h = jnp.einsum("TF,FD->TD", h, weight_param(self, "output", (F, D), dt, (tp, None))) + bias_param(
            self, "output_bias", (D,), dt
        )
        return LayerNorm(D, s.layer_norm_eps, dt, name="output_LayerNorm")(h + x)


class BertModel(nn.Module):
    """The encoder and its head: none (embeddings), or a sequence classifier."""

    spec: EncoderSpec
    dtype: jnp.dtype
    backend: AttentionBackend = AttentionBackend.REFERENCE
    # The tensor-parallel mesh (None: one device).
    mesh: Mesh | None = None

    def setup(self):
        s = self.spec
        D, dt = s.hidden_size, self.dtype
        self.embeddings = BertEmbedding(s, dt, self.mesh, name="embeddings")
        self.layers = [
            BertLayer(s, dt, self.backend, self.mesh, name=f"layers_{i}") for i in range(s.num_hidden_layers)
        ]
        if s.head == ModelHead.CLASSIFY:
            # BERT's pooler dense or RoBERTa's classifier.dense: both [D, D] then tanh.
            # Whole on every device: the head runs once per sequence, not per token.
            self.head_dense = weight_param(self, "head_dense", (D, D), dt)
            self.head_dense_bias = bias_param(self, "head_dense_bias", (D,), dt)
            self.classifier = weight_param(self, "classifier", (D, s.num_labels), dt)
            self.classifier_bias = bias_param(self, "classifier_bias", (s.num_labels,), dt)

    def __call__(self, kv_caches, input_ids, md: AttentionMetadata, constants, token_type_ids=None):
        """kv_caches: None per layer (an encoder keeps no cache), returned as they came;
        token_type_ids [T] (segment of each token), or None / [0] for all zeros.

        Returns (kv_caches, final hidden states [T, D])."""
        if token_type_ids is None or token_type_ids.shape[0] != input_ids.shape[0]:
            token_type_ids = jnp.zeros_like(input_ids)
        x = self.embeddings(input_ids, md.positions, token_type_ids)
        for layer in self.layers:
            x = layer(x, md)
        return kv_caches, x

    def pool_head(self, pooled):
        """pooled [S, D] -> float32 [S, out]: the embedding itself, or the classifier's logits."""
        if self.spec.head != ModelHead.CLASSIFY:
            return pooled.astype(jnp.float32)
        h = jnp.tanh(pooled @ self.head_dense + self.head_dense_bias)
        logits = jnp.einsum("SD,DL->SL", h, self.classifier, preferred_element_type=jnp.float32)
        return logits + self.classifier_bias.astype(jnp.float32)


def build_spec(cfg, head: ModelHead) -> EncoderSpec:
    if head not in (ModelHead.EMBED, ModelHead.CLASSIFY):
        raise ValueError(f"The BERT family has no {head.value!r} head.")
    return EncoderSpec(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_attention_heads,
        head_dim=cfg.hidden_size // cfg.num_attention_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        type_vocab_size=cfg.type_vocab_size,
        layer_norm_eps=cfg.layer_norm_eps,
        hidden_act=getattr(cfg, "hidden_act", "gelu"),
        roberta=getattr(cfg, "model_type", "bert") in _ROBERTA_TYPES,
        pad_token_id=int(getattr(cfg, "pad_token_id", None) or 0),
        head=head,
        num_labels=int(getattr(cfg, "num_labels", 0) or 0) if head == ModelHead.CLASSIFY else 0,
    )


def _linear(hf: str, weight: tuple[str, ...], bias: tuple[str, ...], heads: tuple[int, int] | None = None) -> dict:
    """An HF nn.Linear ([out, in] weight, [out] bias) onto an [in, out] weight, or with
    `heads` (N, H) onto [in, N, H] and an [N, H] bias."""
    if heads is None:
        return {hf + ".weight": (weight, np.transpose), hf + ".bias": (bias, None)}
    return {
        hf + ".weight": (weight, lambda w: w.T.reshape(w.shape[1], *heads)),
        hf + ".bias": (bias, lambda b: b.reshape(heads)),
    }


def _layer_norm(hf: str, path: tuple[str, ...]) -> dict:
    return {hf + ".weight": (path + ("weight",), None), hf + ".bias": (path + ("bias",), None)}


def hf_name_map(spec: EncoderSpec) -> dict[str, tuple[tuple[str, ...], callable]]:
    """HF tensor name -> (param path, host-side transform or None). Names carry the task
    model's prefix (`bert.` / `roberta.`); a base model saved without it loads too
    (models/weights.py retries a name without its first component)."""
    N, H, D = spec.num_attention_heads, spec.head_dim, spec.hidden_size
    base = "roberta." if spec.roberta else "bert."
    emb = base + "embeddings."
    m = {
        emb + "word_embeddings.weight": (("embeddings", "word_embeddings"), None),
        emb + "position_embeddings.weight": (("embeddings", "position_embeddings"), None),
        emb + "token_type_embeddings.weight": (("embeddings", "token_type_embeddings"), None),
        **_layer_norm(emb + "LayerNorm", ("embeddings", "LayerNorm")),
    }
    for i in range(spec.num_hidden_layers):
        pre, layer = f"{base}encoder.layer.{i}.", (f"layers_{i}",)
        at = layer + ("attention",)
        for name in ("query", "key", "value"):
            m.update(_linear(pre + f"attention.self.{name}", at + (name,), at + (f"{name}_bias",), (N, H)))
        m[pre + "attention.output.dense.weight"] = (at + ("dense",), lambda w: w.T.reshape(N, H, D))
        m[pre + "attention.output.dense.bias"] = (at + ("dense_bias",), None)
        m.update(_layer_norm(pre + "attention.output.LayerNorm", at + ("LayerNorm",)))
        m.update(_linear(pre + "intermediate.dense", layer + ("intermediate",), layer + ("intermediate_bias",)))
        m.update(_linear(pre + "output.dense", layer + ("output",), layer + ("output_bias",)))
        m.update(_layer_norm(pre + "output.LayerNorm", layer + ("output_LayerNorm",)))
    if spec.head == ModelHead.CLASSIFY:
        dense, out = (
            ("classifier.dense", "classifier.out_proj") if spec.roberta else (base + "pooler.dense", "classifier")
        )
        m.update(_linear(dense, ("head_dense",), ("head_dense_bias",)))
        m.update(_linear(out, ("classifier",), ("classifier_bias",)))
    return m


def max_positions(hf_config) -> int | None:
    """XLM-R's position table holds pad_token_id + 1 unused rows before the first position."""
    if getattr(hf_config, "model_type", "bert") in _ROBERTA_TYPES:
        return hf_config.max_position_embeddings - int(hf_config.pad_token_id) - 1
    return None


FAMILY = ModelFamily(
    module=BertModel,
    build_spec=build_spec,
    hf_name_map=hf_name_map,
    is_encoder=True,
    default_pooling_type="CLS",
    max_positions=max_positions,
)
