"""What the engine needs of a model family, and nothing more.

A family is one file under `jllm/models/` that exports `FAMILY`: its Flax module, how
its spec is read from an HF config, how checkpoint tensors map onto its parameters, and
the constant tables its steps read (rotary cos/sin). The registry maps HF architecture
names onto a family and a head; the engine never imports a family itself, so a new
family touches only its own file and the registry.

The module's contract, for every family:
- `module(spec, dtype, backend)`; `spec` subclasses `ModelShape`.
- `__call__(kv_caches, input_ids, md, constants, token_type_ids) -> (kv_caches, hidden [T, D])`:
  `kv_caches` is a per-layer list of `KVCache`, or of None where no cache is kept (pooling
  runs: each sequence attends to its own tokens in the step, `layers.attention.attention`);
  `token_type_ids` is [T] (BERT's segments) or [0] for models without them.
- `compute_logits(hidden [S, D]) -> float32 [S, V]` where the head is "lm".
- `pool_head(pooled [S, D]) -> float32 [S, out]`: the head after pooling ("embed": the
  hidden states themselves; "classify", "reward": the checkpoint's classifier).
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable
from typing import Any


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """The sizes the engine plans memory and buckets by."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int


class ModelHead(str, enum.Enum):
    """What sits on the final hidden states."""

    LM = "lm"  # vocabulary logits: text generation
    EMBED = "embed"  # nothing: the pooled hidden states are the embedding
    CLASSIFY = "classify"  # a sequence classifier (`*ForSequenceClassification`)
    REWARD = "reward"  # a per-token reward head (`*ForRewardModel`)


@dataclasses.dataclass(frozen=True)
class ModelFamily:
    module: type
    # (hf_config, head) -> the family's spec.
    build_spec: Callable[[Any, ModelHead], ModelShape]
    # spec -> {HF tensor name: (parameter path, host-side transform or None)}.
    hf_name_map: Callable[[ModelShape], dict[str, tuple[tuple[str, ...], Callable | None]]]
    # (spec, hf_config, max_model_len) -> {name: host array}: the tables every step reads.
    constants: Callable[[ModelShape, Any, int], dict] = lambda spec, hf_config, max_model_len: {}
    # Bidirectional attention (encoders): every token sees its whole sequence; no KV cache.
    is_encoder: bool = False
    # How a pooling model of this family pools by default (vLLM's per-architecture default):
    # "CLS" for encoders, "LAST" for decoders.
    default_pooling_type: str = "LAST"
    # hf_config -> the longest sequence its position table serves, where that is not
    # max_position_embeddings (XLM-R's positions start after padding_idx), else None.
    max_positions: Callable[[Any], int | None] = lambda hf_config: None
