"""Weight-only quantized checkpoints (AWQ, GPTQ) kept quantized on the device: which
method a model uses (its config's `quantization_config`, or `quantization=` as in vLLM),
and each method's settings and on-disk layout."""

from __future__ import annotations

from jllm.layers.quantization.awq import AWQConfig
from jllm.layers.quantization.base_config import QuantizationConfig
from jllm.layers.quantization.gptq import GPTQConfig

QUANTIZATION_METHODS: dict[str, type[QuantizationConfig]] = {"awq": AWQConfig, "gptq": GPTQConfig}


def get_quantization_config(hf_config, quantization: str | None) -> QuantizationConfig | None:
    """The checkpoint's quantization, checked against the one asked for (None: whatever the
    checkpoint says)."""
    config = getattr(hf_config, "quantization_config", None)
    if config is not None and not isinstance(config, dict):
        config = config.to_dict()
    method = str(config.get("quant_method", "")).lower() if config else None
    if quantization is not None and method is not None and quantization != method:
        raise ValueError(
            f"Quantization method specified in the model config ({method}) does not match the quantization "
            f"method specified in the `quantization` argument ({quantization})."
        )
    if method is None:
        if quantization is not None:
            raise ValueError(
                f"quantization={quantization!r} needs a {quantization} checkpoint: the model's config has no "
                "quantization_config."
            )
        return None
    if method not in QUANTIZATION_METHODS:
        raise ValueError(f"Unknown quantization method: {method}. Must be one of {list(QUANTIZATION_METHODS)}.")
    return QUANTIZATION_METHODS[method].from_config(config)


__all__ = ["AWQConfig", "GPTQConfig", "QUANTIZATION_METHODS", "QuantizationConfig", "get_quantization_config"]
