"""End-to-end latency of one batch, in the manner of `vllm bench latency`: a batch of
random token prompts generated to a fixed length (ignore_eos), timed over several
iterations after warm-up; dummy weights at a real model's shape.

    python scripts/benchmark_latency.py --shape llama-3.2-1b --input-len 32 --output-len 128 \
        --batch-size 8 [--num-iters-warmup 10] [--num-iters 30] [engine flags]

Prints the average and vLLM's percentiles (10, 25, 50, 75, 90, 99) of the batch's latency
and writes a JSON record under scripts/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from jllm import LLM, EngineArgs, SamplingParams  # noqa: E402
from scripts.bench_utils import run_header  # noqa: E402
from scripts.model_shapes import SHAPES, write_shape  # noqa: E402

PERCENTILES = (10, 25, 50, 75, 90, 99)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    EngineArgs.add_cli_args(parser)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.2-1b")
    parser.add_argument("--input-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--n", type=int, default=1, help="samples per prompt")
    parser.add_argument("--num-iters-warmup", type=int, default=10)
    parser.add_argument("--num-iters", type=int, default=30)
    parser.add_argument("--results-dir", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args()

    engine_args = EngineArgs.from_cli_args(args)
    engine_args.model = write_shape(args.shape, tempfile.mkdtemp(prefix="jllm_shape_"))
    engine_args.load_format = "dummy"
    engine_args.skip_tokenizer_init = True
    llm = LLM(**vars(engine_args))
    vocab = SHAPES[args.shape]["vocab_size"]
    rng = np.random.default_rng(0)
    prompts = [{"prompt_token_ids": rng.integers(0, vocab, args.input_len).tolist()} for _ in range(args.batch_size)]
    params = SamplingParams(
        n=args.n, temperature=1.0, top_p=1.0, ignore_eos=True, max_tokens=args.output_len, detokenize=False
    )

    def run_once() -> float:
        start = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        return time.perf_counter() - start

    for _ in range(args.num_iters_warmup):
        run_once()
    latencies = np.asarray([run_once() for _ in range(args.num_iters)])
    percentiles = {str(p): float(np.percentile(latencies, p)) for p in PERCENTILES}
    print(f"Avg latency: {latencies.mean():.4f} seconds")
    for p, value in percentiles.items():
        print(f"{p}% percentile latency: {value:.4f} seconds")

    record = {
        **run_header(),
        "shape": args.shape,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "batch_size": args.batch_size,
        "n": args.n,
        "attention_backend": llm.llm_engine.model_config.attention_backend,
        "tensor_parallel_size": engine_args.tensor_parallel_size,
        "data_parallel_size": engine_args.data_parallel_size,
        "avg_latency": float(latencies.mean()),
        "ms_per_output_token": 1e3 * float(latencies.mean()) / args.output_len,
        "latencies": latencies.tolist(),
        "percentiles": percentiles,
    }
    os.makedirs(args.results_dir, exist_ok=True)
    name = f"latency_{args.shape}_{record['date']}_{int(time.time())}.json"
    with open(os.path.join(args.results_dir, name), "w") as f:
        json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
