"""GPTQ checkpoints (AutoGPTQ / GPTQModel): `qweight` [K // pack, N] packed along K,
`qzeros` [G, N // pack] packed along N, `scales` [G, N], `g_idx` [K] (each row's group).
The gptq format stores zero points minus one (AutoGPTQ's historical off-by-one);
gptq_v2 stores them as they are. With desc_act (act order) rows of a group lie apart:
at load the rows are sorted by group and the device gathers activation columns alike."""

from __future__ import annotations

import dataclasses

import numpy as np

from jllm.layers.quantization.base_config import QuantizationConfig
from jllm.layers.quantization.layout import device_tensors, unpack_cols, unpack_rows

SUPPORTED_BITS = (4, 8)
SUPPORTED_GROUP_SIZES = (-1, 32, 64, 128)
CHECKPOINT_FORMATS = ("gptq", "gptq_v2")


@dataclasses.dataclass(frozen=True)
class GPTQConfig(QuantizationConfig):
    # gptq_v2 stores zero points as they are; gptq (v1) minus one.
    zeros_minus_one: bool = True

    @classmethod
    def get_name(cls) -> str:
        return "gptq"

    @classmethod
    def from_config(cls, config: dict) -> GPTQConfig:
        bits, group_size = config.get("bits"), config.get("group_size", -1)
        checkpoint_format = config.get("checkpoint_format", "gptq")
        if bits not in SUPPORTED_BITS:
            raise ValueError(
                f"Currently, only {list(SUPPORTED_BITS)}-bit weight quantization is supported for GPTQ, "
                f"but got {bits} bits."
            )
        if group_size not in SUPPORTED_GROUP_SIZES:
            raise ValueError(
                f"GPTQ group_size {group_size} is not supported (supported: {list(SUPPORTED_GROUP_SIZES)})."
            )
        if checkpoint_format not in CHECKPOINT_FORMATS:
            raise ValueError(
                f"GPTQ checkpoint_format {checkpoint_format!r} is not supported (supported: {list(CHECKPOINT_FORMATS)})."
            )
        return cls(
            weight_bits=bits,
            group_size=group_size,
            zero_point=not config.get("sym", True),
            desc_act=bool(config.get("desc_act", False)),
            zeros_minus_one=checkpoint_format == "gptq",
        )

    def layer_to_device(self, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        bits = self.weight_bits
        values = unpack_rows(tensors["qweight"], bits)
        zeros = None
        if self.zero_point:
            zeros = unpack_cols(tensors["qzeros"], bits) + int(self.zeros_minus_one)
        perm = None
        if self.desc_act:
            perm = np.argsort(tensors["g_idx"], kind="stable")
            values = values[perm]
            num_groups = tensors["scales"].shape[0]
            if not np.array_equal(
                np.bincount(tensors["g_idx"], minlength=num_groups), np.full(num_groups, len(perm) // num_groups)
            ):
                raise ValueError("GPTQ g_idx does not give every group the same number of rows.")
        return device_tensors(values, tensors["scales"], zeros, bits, perm)
