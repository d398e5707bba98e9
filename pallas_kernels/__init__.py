"""Pallas (Triton backend) GPU kernels for jllm, each next to its plain-jnp reference; their
tuned launch settings in `tuning`."""

from pallas_kernels.kv_write import write_kv, write_kv_reference
from pallas_kernels.paged_decode_attention import (
    new_decode_tickets,
    paged_decode_attention,
    paged_decode_attention_reference,
)
from pallas_kernels.quantized_matmul import quantized_matmul, quantized_matmul_reference
from pallas_kernels.ragged_paged_attention import (
    ragged_paged_attention,
    ragged_paged_attention_reference,
)
from pallas_kernels.tuning import DecodeConfig, decode_config

__all__ = [
    "DecodeConfig",
    "decode_config",
    "new_decode_tickets",
    "paged_decode_attention",
    "paged_decode_attention_reference",
    "quantized_matmul",
    "quantized_matmul_reference",
    "ragged_paged_attention",
    "ragged_paged_attention_reference",
    "write_kv",
    "write_kv_reference",
]
