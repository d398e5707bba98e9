"""What every weight-only quantization method shares: its settings, which device tensors
a quantized linear holds, and the pass that converts a checkpoint's tensors to them."""

from __future__ import annotations

import dataclasses

import numpy as np

QUANTIZED_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")


@dataclasses.dataclass(frozen=True)
class QuantizationConfig:
    """Frozen and hashable: it rides in the model's spec into the jitted step."""

    weight_bits: int
    # Input rows per scale / zero point; -1: one group spanning all of K.
    group_size: int
    # Whether the device keeps zero points (else symmetric around 2 ** (bits - 1)).
    zero_point: bool
    # GPTQ's act order: the device keeps `g_perm` and gathers activation columns by it.
    desc_act: bool = False

    @classmethod
    def get_name(cls) -> str:
        raise NotImplementedError

    def device_tensor_names(self) -> tuple[str, ...]:
        return ("qweight", "scales") + ("qzeros",) * self.zero_point + ("g_perm",) * self.desc_act

    def layer_to_device(self, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One linear's checkpoint tensors ({suffix: array}) -> its device tensors."""
        raise NotImplementedError

    def convert_checkpoint(self, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Every quantized linear's tensors (`<prefix>.qweight` and its siblings) replaced
        by its device tensors under the same prefix; other tensors pass through."""
        prefixes = [name[: -len(".qweight")] for name in weights if name.endswith(".qweight")]
        out = dict(weights)
        for prefix in prefixes:
            tensors = {s: out.pop(f"{prefix}.{s}") for s in QUANTIZED_SUFFIXES if f"{prefix}.{s}" in out}
            for suffix, array in self.layer_to_device(tensors).items():
                out[f"{prefix}.{suffix}"] = array
        return out
