"""On the GPU: greedy tokens and logprobs of the Pallas attention path against the
plain-jnp reference, on random-weight models (head_dim 64 and 128, GQA).

    python scripts/compare_backends.py
"""
from __future__ import annotations

import logging
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from jllm import LLM, SamplingParams  # noqa: E402


def make_model(folder: str, head_dim: int, seed: int) -> str:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=4096, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                         num_attention_heads=512 // head_dim * 2, num_key_value_heads=2, head_dim=head_dim,
                         max_position_embeddings=4096, architectures=["LlamaForCausalLM"])
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.08)
    model.save_pretrained(folder)
    return folder


def run(folder: str, backend: str, dtype: str, prompts):
    llm = LLM(model=folder, skip_tokenizer_init=True, dtype=dtype, attention_backend=backend,
              max_model_len=2048, max_num_seqs=16, max_num_batched_tokens=512, enforce_eager=True)
    params = SamplingParams(temperature=0.0, max_tokens=32, logprobs=5, detokenize=False)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [(list(o.outputs[0].token_ids), o.outputs[0].logprobs) for o in outs]


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    rng = np.random.default_rng(0)
    # Lengths around page edges and a long prompt that needs chunked prefill.
    lengths = [1, 15, 16, 17, 100, 700, 1300, 33]
    prompts = [rng.integers(0, 4096, n).tolist() for n in lengths]
    rows = []
    for head_dim in (64, 128):
        folder = make_model(tempfile.mkdtemp(), head_dim, seed=head_dim)
        for dtype in ("float32", "bfloat16"):
            # The batch, then the longest prompt alone: its first 512-token chunk is a
            # fresh prefill (cuDNN in bfloat16), the rest ragged and decode steps.
            ref = run(folder, "reference", dtype, prompts) + run(folder, "reference", dtype, [prompts[6]])
            ker = run(folder, "pallas", dtype, prompts) + run(folder, "pallas", dtype, [prompts[6]])
            same = sum(a[0] == b[0] for a, b in zip(ref, ker))
            # Logprob of the first generated token (same context on both sides).
            diffs = [abs(a[1][0][a[0][0]].logprob - b[1][0][a[0][0]].logprob) for a, b in zip(ref, ker)
                     if a[0][0] in b[1][0]]
            rows.append((head_dim, dtype, f"{same}/{len(ref)}", f"{max(diffs):.2e}"))
    print("\nhead_dim  dtype     greedy_equal  max|dlogprob| first token")
    for r in rows:
        print(f"{r[0]:<9} {r[1]:<9} {r[2]:<13} {r[3]}")


if __name__ == "__main__":
    main()
