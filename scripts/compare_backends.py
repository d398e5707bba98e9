"""On the GPU: greedy tokens and logprobs of the Pallas attention path against the
plain-jnp reference, on random-weight models (head_dim 64 and 128, GQA).

    python scripts/compare_backends.py [--head-dim 128] [--dtype float32]

Exits 1 unless, per dtype, the logprobs on shared context agree within TOLERANCE and
every greedy divergence is a tie: the kernel path's token among the reference's top
logprobs, where the reference's top two were within TOLERANCE's tie gap. Random weights
give near-flat distributions, so rounding flips such ties in bfloat16 (and in float32,
rarely); a real disagreement shows up as a wide gap.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from jllm import LLM, SamplingParams  # noqa: E402

# dtype -> (largest |dlogprob| on shared context, largest reference top-2 gap at which a
# greedy divergence counts as a tie). Measured on the H100: float32 2.2e-4 and gaps
# down to 5e-5; bfloat16 2.6e-3 and gaps up to 9.5e-4 (BUILD_NOTES.md, "Testing approach").
TOLERANCE = {"float32": (1e-3, 1e-3), "bfloat16": (2e-2, 1e-2)}


def make_model(folder: str, head_dim: int, seed: int) -> str:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=4096,
        hidden_size=512,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=512 // head_dim * 2,
        num_key_value_heads=2,
        head_dim=head_dim,
        max_position_embeddings=4096,
        architectures=["LlamaForCausalLM"],
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.08)
    model.save_pretrained(folder)
    return folder


def run(folder: str, backend: str, dtype: str, prompts):
    llm = LLM(
        model=folder,
        skip_tokenizer_init=True,
        dtype=dtype,
        attention_backend=backend,
        max_model_len=2048,
        max_num_seqs=16,
        max_num_batched_tokens=512,
        enforce_eager=True,
    )
    params = SamplingParams(temperature=0.0, max_tokens=32, logprobs=5, detokenize=False)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [(list(o.outputs[0].token_ids), o.outputs[0].logprobs) for o in outs]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--head-dim",
        type=int,
        action="append",
        choices=(64, 128),
        help="model head_dim to compare (repeatable); default both",
    )
    parser.add_argument(
        "--dtype", action="append", choices=("float32", "bfloat16"), help="dtype to compare (repeatable); default both"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    rng = np.random.default_rng(0)
    # Lengths around page edges and a long prompt that needs chunked prefill.
    lengths = [1, 15, 16, 17, 100, 700, 1300, 33]
    prompts = [rng.integers(0, 4096, n).tolist() for n in lengths]
    rows, failures = [], []
    for head_dim in args.head_dim or (64, 128):
        folder = make_model(tempfile.mkdtemp(), head_dim, seed=head_dim)
        for dtype in args.dtype or ("float32", "bfloat16"):
            # The batch, then the longest prompt alone: its first 512-token chunk is a
            # fresh prefill, its next two prefix prefills (in bfloat16 cuDNN for both,
            # over the cached pages too for the latter), then decode steps.
            ref = run(folder, "reference", dtype, prompts) + run(folder, "reference", dtype, [prompts[6]])
            ker = run(folder, "pallas", dtype, prompts) + run(folder, "pallas", dtype, [prompts[6]])
            same = sum(a[0] == b[0] for a, b in zip(ref, ker))
            found = divergences(ref, ker)
            diff = max_common_diff(ref, ker)
            failures += [f"head_dim {head_dim} {dtype}: {f}" for f in verdict(dtype, diff, found)]
            rows.append(
                (
                    head_dim,
                    dtype,
                    f"{same}/{len(ref)}",
                    f"{diff:.2e}",
                    ", ".join(
                        f"{p}@{i}: {gap:.1e}" + ("" if in_top else " (not in top-k)") for p, i, gap, in_top in found
                    ),
                )
            )
    print(
        "\nhead_dim  dtype     greedy_equal  max|dlogprob| on shared context   divergences (prompt@token: "
        "reference top-1 minus top-2 logprob there)"
    )
    for r in rows:
        print(f"{r[0]:<9} {r[1]:<9} {r[2]:<13} {r[3]:<33} {r[4] or '-'}")
    print("\n" + ("\n".join(f"FAIL {f}" for f in failures) if failures else "PASS: every divergence a tie"))
    sys.exit(1 if failures else 0)


def verdict(dtype: str, max_diff: float, found) -> list[str]:
    """What fails TOLERANCE: the shared-context logprob difference, and each divergence
    (prompt, token, reference top-2 gap, kernel token in the reference's top-k) that is
    not a tie."""
    diff_tol, tie_gap = TOLERANCE[dtype]
    failures = [f"max |dlogprob| {max_diff:.2e} > {diff_tol:.0e}"] if max_diff > diff_tol else []
    for p, i, gap, in_top in found:
        if not in_top or gap > tie_gap:
            failures.append(
                f"prompt {p} token {i}: reference top-2 gap {gap:.1e}"
                + ("" if in_top else ", kernel's token not in its top-k")
            )
    return failures


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def max_common_diff(ref, ker) -> float:
    """Largest |logprob difference| of the reference's token at every position where both
    sides have generated the same tokens so far (the same context)."""
    diffs = []
    for (ids_r, lps_r), (ids_k, lps_k) in zip(ref, ker):
        for i in range(min(common_prefix(ids_r, ids_k) + 1, len(ids_r), len(ids_k))):
            if ids_r[i] in lps_k[i]:
                diffs.append(abs(lps_r[i][ids_r[i]].logprob - lps_k[i][ids_r[i]].logprob))
    return max(diffs)


def divergences(ref, ker) -> list[tuple[int, int, float, bool]]:
    """(prompt, token index, the reference's top-1 minus top-2 logprob there, whether the
    kernel path's token is among the reference's top logprobs) where greedy sequences
    first differ: a near tie flipped by rounding, or a real disagreement."""
    out = []
    for p, ((ids_r, lps_r), (ids_k, _)) in enumerate(zip(ref, ker)):
        i = common_prefix(ids_r, ids_k)
        if i < min(len(ids_r), len(ids_k)):
            top = sorted((lp.logprob for lp in lps_r[i].values()), reverse=True)
            out.append((p, i, top[0] - top[1], ids_k[i] in lps_r[i]))
    return out


if __name__ == "__main__":
    main()
