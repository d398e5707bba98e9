"""Which model class serves which HF `architectures` entry, and its DecoderSpec."""

from __future__ import annotations

from jllm.models.llama import DecoderSpec, LlamaForCausalLM


def _llama_spec(cfg) -> DecoderSpec:
    attention_bias = bool(getattr(cfg, "attention_bias", False))
    return _base_spec(
        cfg, qkv_bias=attention_bias, o_bias=attention_bias, mlp_bias=bool(getattr(cfg, "mlp_bias", False))
    )


def _mistral_spec(cfg) -> DecoderSpec:
    return _base_spec(cfg, sliding_window=getattr(cfg, "sliding_window", None))


def _qwen2_spec(cfg) -> DecoderSpec:
    window = cfg.sliding_window if getattr(cfg, "use_sliding_window", False) else None
    return _base_spec(cfg, qkv_bias=True, sliding_window=window)


def _qwen3_spec(cfg) -> DecoderSpec:
    window = cfg.sliding_window if getattr(cfg, "use_sliding_window", False) else None
    attention_bias = bool(getattr(cfg, "attention_bias", False))
    return _base_spec(cfg, qkv_bias=attention_bias, o_bias=attention_bias, qk_norm=True, sliding_window=window)


def _base_spec(cfg, **overrides) -> DecoderSpec:
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
        **overrides,
    )


_MODELS = {
    "LlamaForCausalLM": (LlamaForCausalLM, _llama_spec),
    "MistralForCausalLM": (LlamaForCausalLM, _mistral_spec),
    "Qwen2ForCausalLM": (LlamaForCausalLM, _qwen2_spec),
    "Qwen3ForCausalLM": (LlamaForCausalLM, _qwen3_spec),
}


def supported_architectures() -> list[str]:
    return sorted(_MODELS)


def resolve_model(hf_config):
    """Returns (model class, DecoderSpec) for the config's first supported architecture."""
    architectures = list(getattr(hf_config, "architectures", None) or [])
    for arch in architectures:
        if arch in _MODELS:
            model_cls, spec_fn = _MODELS[arch]
            return model_cls, spec_fn(hf_config)
    raise ValueError(
        f"Model architectures {architectures} are not supported for now. "
        f"Supported architectures: {supported_architectures()}"
    )
