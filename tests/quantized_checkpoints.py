"""Write real AWQ and GPTQ checkpoints of tiny random-weight HF models.

Each linear of the decoder layers (q/k/v/o, gate/up/down) is quantized round-to-nearest per
group with numpy and packed exactly as the format's own tool packs it:
- AWQ: AutoAWQ's `WQLinear_GEMM.from_linear` (qweight [in, out // 8] and qzeros [G, out // 8]
  packed along out in AWQ_ORDER, scales [G, out]; zero points from min/max as AutoAWQ's
  `pseudo_quantize_tensor`);
- GPTQ: AutoGPTQ's `QuantLinear.pack` (qweight [in // pack, out] packed along in, qzeros
  [G, out // pack] packed along out and stored minus one in the "gptq" format, as they are in
  GPTQModel's "gptq_v2"), with `g_idx`; act order draws a random column order as GPTQ's
  Hessian sort would and assigns groups along it.
The HF model's Linear weights are then overwritten with the dequantized values, so that HF
float32 runs exactly the weights the checkpoint holds.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch
from safetensors.numpy import save_file

from jllm.layers.quantization.awq import AWQ_ORDER

PROJECTIONS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


def _pack(values: np.ndarray, bits: int, axis: int, order=None) -> np.ndarray:
    """Pack unsigned `bits`-bit values along `axis` into int32: slot i of each word holds
    element word * pack + order[i] of that axis."""
    pack = 32 // bits
    order = list(order or range(pack))
    v = np.moveaxis(values.astype(np.uint32), axis, 0)
    v = v.reshape(v.shape[0] // pack, pack, *v.shape[1:])
    word = np.zeros(v.shape[:1] + v.shape[2:], np.uint32)
    for i in range(pack):
        word |= v[:, order[i]] << np.uint32(i * bits)
    return np.moveaxis(word, 0, axis).view(np.int32)


def _quantize(w_in_out: np.ndarray, bits: int, group_size: int, sym: bool, groups: np.ndarray):
    """Round-to-nearest per group of input rows. w [K, N] float32 -> (q [K, N], scales [G, N],
    zeros [G, N]) with w ~ (q - zeros[groups]) * scales[groups]."""
    maxq = (1 << bits) - 1
    num_groups = groups.max() + 1
    scales = np.zeros((num_groups, w_in_out.shape[1]), np.float32)
    zeros = np.zeros_like(scales)
    for g in range(num_groups):
        rows = w_in_out[groups == g]
        lo, hi = rows.min(axis=0), rows.max(axis=0)
        if sym:
            scales[g] = np.maximum(np.abs(lo), np.abs(hi)) * 2 / maxq + 1e-6
            zeros[g] = (maxq + 1) // 2
        else:
            scales[g] = np.maximum(hi - lo, 1e-5) / maxq
            # From 1: the "gptq" format stores zero points minus one and cannot hold a 0.
            zeros[g] = np.clip(-np.round(lo / scales[g]), 1, maxq)
    # float16 scales, as both tools save them.
    scales = scales.astype(np.float16).astype(np.float32)
    q = np.clip(np.round(w_in_out / scales[groups]) + zeros[groups], 0, maxq).astype(np.int64)
    return q, scales, zeros.astype(np.int64)


def quantize_and_save(
    model,
    folder: str,
    method: str,
    *,
    bits: int = 4,
    group_size: int = 64,
    sym: bool = False,
    desc_act: bool = False,
    checkpoint_format: str = "gptq",
    seed: int = 0,
) -> None:
    """Quantize `model`'s projections in place (dequantized back into its Linear weights)
    and save the quantized checkpoint, config.json with its quantization_config included."""
    rng = np.random.default_rng(seed)
    state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    for i in range(model.config.num_hidden_layers):
        for proj in PROJECTIONS:
            prefix = f"model.layers.{i}.{proj}"
            w = state.pop(prefix + ".weight").T  # [in, out]
            k = w.shape[0]
            gs = k if group_size == -1 else group_size
            order = rng.permutation(k) if desc_act else np.arange(k)
            groups = np.empty(k, np.int64)
            groups[order] = np.arange(k) // gs
            q, scales, zeros = _quantize(w, bits, gs, sym, groups)
            if method == "awq":
                state[prefix + ".qweight"] = _pack(q, bits, axis=1, order=AWQ_ORDER)
                state[prefix + ".qzeros"] = _pack(zeros, bits, axis=1, order=AWQ_ORDER)
            else:
                stored = zeros - 1 if checkpoint_format == "gptq" else zeros
                state[prefix + ".qweight"] = _pack(q, bits, axis=0)
                state[prefix + ".qzeros"] = _pack(stored & ((1 << bits) - 1), bits, axis=1)
                state[prefix + ".g_idx"] = groups.astype(np.int32)
            state[prefix + ".scales"] = scales.astype(np.float16)
            dequantized = (q - zeros[groups]) * scales[groups]
            with torch.no_grad():
                model.get_submodule(prefix).weight.copy_(torch.from_numpy(dequantized.T.astype(np.float32)))
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    os.makedirs(folder, exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, os.path.join(folder, "model.safetensors"))
    config = model.config.to_dict() | {"architectures": [type(model).__name__]}
    if method == "awq":
        config["quantization_config"] = dict(
            quant_method="awq", bits=bits, group_size=group_size, zero_point=True, version="gemm"
        )
    else:
        config["quantization_config"] = dict(
            quant_method="gptq",
            bits=bits,
            group_size=group_size,
            sym=sym,
            desc_act=desc_act,
            checkpoint_format=checkpoint_format,
        )
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
