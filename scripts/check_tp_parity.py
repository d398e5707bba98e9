"""On several GPUs: greedy tokens and logprobs of tensor_parallel_size N against one
device, at a real model's shape with dummy weights (default Llama-3.1-8B, bfloat16).

    python scripts/check_tp_parity.py --shape llama-3.1-8b --tensor-parallel-size 2 [--dtype bfloat16]

Each size runs in its own process (each engine takes most of its cards' memory). Splitting
the matmuls changes the order of their sums, so tokens may differ where the one-device
run's top two logprobs were a near tie; the verdict is scripts/compare_backends.py's:
logprobs on shared context within its tolerance, every divergence a tie. Writes a JSON
record under scripts/results/ and exits 1 on failure.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import types

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from scripts.compare_backends import divergences, max_common_diff, verdict  # noqa: E402
from scripts.bench_utils import run_header  # noqa: E402
from scripts.model_shapes import SHAPES, write_shape  # noqa: E402

PROMPT_LENS = (1, 17, 100, 700, 1500, 33)


def generate(args) -> None:
    """The child: greedy outputs at one size, as JSON [[ids, [{id: logprob}, ...]], ...]."""
    from jllm import LLM, SamplingParams

    llm = LLM(
        model=write_shape(args.shape, tempfile.mkdtemp(prefix="jllm_shape_")),
        load_format="dummy",
        skip_tokenizer_init=True,
        dtype=args.dtype,
        tensor_parallel_size=args.child_tp,
        max_model_len=4096,
        gpu_memory_utilization=0.8,
    )
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, SHAPES[args.shape]["vocab_size"], n).tolist() for n in PROMPT_LENS]
    params = SamplingParams(temperature=0.0, max_tokens=32, logprobs=5, detokenize=False)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    result = [
        [list(o.outputs[0].token_ids), [{t: lp.logprob for t, lp in pos.items()} for pos in o.outputs[0].logprobs]]
        for o in outputs
    ]
    with open(args.child_out, "w") as f:
        json.dump(result, f)


def run(args, tp: int):
    out = tempfile.mktemp(suffix=".json")
    cmd = [sys.executable, __file__, "--shape", args.shape, "--dtype", args.dtype, "--child-tp", str(tp)]
    subprocess.run([*cmd, "--child-out", out], check=True)
    with open(out) as f:
        rows = json.load(f)
    # compare_backends reads {id: Logprob}; JSON keys come back as strings.
    wrap = lambda pos: {int(t): types.SimpleNamespace(logprob=v) for t, v in pos.items()}  # noqa: E731
    return [(ids, [wrap(pos) for pos in lps]) for ids, lps in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.1-8b")
    parser.add_argument("--tensor-parallel-size", type=int, default=2)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16")
    parser.add_argument("--results-dir", default=os.path.join(os.path.dirname(__file__), "results"))
    parser.add_argument("--child-tp", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_tp:
        return generate(args)
    one, many = run(args, 1), run(args, args.tensor_parallel_size)
    found = divergences(one, many)
    diff = max_common_diff(one, many)
    failures = verdict(args.dtype, diff, found)

    record = {
        **run_header(),
        "shape": args.shape,
        "dtype": args.dtype,
        "tensor_parallel_size": args.tensor_parallel_size,
        "greedy_equal": f"{sum(a[0] == b[0] for a, b in zip(one, many))}/{len(one)}",
        "max_abs_dlogprob_shared_context": diff,
        "divergences": [dict(prompt=p, token=i, top2_gap=gap, in_top_k=in_top) for p, i, gap, in_top in found],
        "failures": failures,
    }
    os.makedirs(args.results_dir, exist_ok=True)
    name = f"tp_parity_{args.shape}_tp{args.tensor_parallel_size}_{record['date']}.json"
    with open(os.path.join(args.results_dir, name), "w") as f:
        json.dump(record, f, indent=1)
    print(json.dumps(record, indent=1))
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
