"""AWQ checkpoints (AutoAWQ's GEMM version): 4-bit `qweight` [K, N // 8] and `qzeros`
[G, N // 8] packed along N in AutoAWQ's interleaved order, `scales` [G, N]; w = (q - z) * s."""

from __future__ import annotations

import dataclasses

import numpy as np

from jllm.layers.quantization.base_config import QuantizationConfig
from jllm.layers.quantization.layout import device_tensors, unpack_cols

# AutoAWQ's GEMM packer puts column c * 8 + AWQ_ORDER[i] into nibble i of packed column c.
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
SUPPORTED_GROUP_SIZES = (32, 64, 128)


@dataclasses.dataclass(frozen=True)
class AWQConfig(QuantizationConfig):
    @classmethod
    def get_name(cls) -> str:
        return "awq"

    @classmethod
    def from_config(cls, config: dict) -> AWQConfig:
        bits = config.get("bits", config.get("w_bit"))
        group_size = config.get("group_size", config.get("q_group_size"))
        version = str(config.get("version", "gemm")).lower()
        if bits != 4:
            raise ValueError(f"Currently, only 4-bit weight quantization is supported for AWQ, but got {bits} bits.")
        if group_size not in SUPPORTED_GROUP_SIZES:
            raise ValueError(
                f"AWQ group_size {group_size} is not supported (supported: {list(SUPPORTED_GROUP_SIZES)})."
            )
        if version != "gemm":
            raise ValueError(f"AWQ version {version!r} is not supported: only AutoAWQ's GEMM layout ('gemm') is.")
        if not config.get("zero_point", True):
            raise ValueError("AWQ without zero points (zero_point=false) is not supported.")
        return cls(weight_bits=4, group_size=group_size, zero_point=True)

    def layer_to_device(self, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = unpack_cols(tensors["qweight"], self.weight_bits, AWQ_ORDER)
        zeros = unpack_cols(tensors["qzeros"], self.weight_bits, AWQ_ORDER)
        return device_tensors(values, tensors["scales"], zeros, self.weight_bits, None)
