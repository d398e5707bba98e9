"""Offline pooling throughput: embeddings of N random-token texts of a fixed length, with
dummy weights at a real embedding model's shape, against HF transformers on the same GPU.

    python scripts/benchmark_pooling.py --shape bert-base --input-len 128 --num-prompts 10000 \\
        [--dtype float16] [--max-num-batched-tokens 16384] [engine flags]

The baseline (HF transformers, the model sentence-transformers wraps, in the same dtype
with SDPA attention, pooled as the model pools: BERT by mean, Qwen3 by last token, then
normalized) runs first, in its own process (JAX would otherwise hold 75 % of the card),
at the best of several batch sizes picked on a subset. Both sides get token ids, so
tokenization is outside both timings. Writes a JSON record under scripts/results/.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from scripts.bench_utils import run_header  # noqa: E402
from scripts.model_shapes import SHAPES, write_shape  # noqa: E402

_BASELINE_BATCHES = (32, 64, 128, 256, 512)


def _prompts(shape: str, num: int, length: int, seed: int) -> np.ndarray:
    # Ids past the special tokens, as real text has.
    return np.random.default_rng(seed).integers(1000, SHAPES[shape]["vocab_size"], (num, length), dtype=np.int64)


def hf_baseline(folder: str, shape: str, num: int, length: int, dtype: str) -> dict:
    """Sequences/s of HF transformers at its best batch size (picked on 1,000 texts)."""
    import torch
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(folder)
    with torch.device("cuda"):
        model = AutoModel.from_config(config, dtype=getattr(torch, dtype), attn_implementation="sdpa").eval()
    ids = torch.from_numpy(_prompts(shape, num, length, seed=1)).cuda()
    mean = config.model_type == "bert"

    @torch.inference_mode()
    def run(texts: torch.Tensor, batch: int) -> float:
        torch.cuda.synchronize()
        start = time.perf_counter()
        for i in range(0, len(texts), batch):
            chunk = texts[i : i + batch]
            mask = torch.ones_like(chunk)
            hidden = model(input_ids=chunk, attention_mask=mask).last_hidden_state
            pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True) if mean else hidden[:, -1]
            torch.nn.functional.normalize(pooled.float(), dim=-1).cpu()
        torch.cuda.synchronize()
        return time.perf_counter() - start

    sweep = {}
    for batch in _BASELINE_BATCHES:
        try:
            run(ids[: min(batch, 1000)], batch)  # warm-up
            sweep[batch] = min(1000, num) / run(ids[:1000], batch)
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            break
    best = max(sweep, key=sweep.get)
    seconds = run(ids, best)
    return {
        "batch_size": best,
        "sweep_seqs_per_s": {str(k): round(v, 1) for k, v in sweep.items()},
        "seqs_per_s": round(num / seconds, 1),
        "tokens_per_s": round(num * length / seconds, 1),
        "torch_version": torch.__version__,
    }


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from jllm import EngineArgs

    parser = argparse.ArgumentParser(description=__doc__)
    EngineArgs.add_cli_args(parser)
    parser.add_argument("--shape", choices=["bert-base", "qwen3-0.6b"], default="bert-base")
    parser.add_argument("--num-prompts", type=int, default=10000)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--baseline-only", help=argparse.SUPPRESS)  # the baseline's own process
    parser.add_argument("--results-dir", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args()
    dtype = args.dtype if args.dtype != "auto" else ("float16" if args.shape == "bert-base" else "bfloat16")
    if args.baseline_only:
        print(json.dumps(hf_baseline(args.baseline_only, args.shape, args.num_prompts, args.input_len, dtype)))
        return

    folder = write_shape(args.shape, tempfile.mkdtemp(prefix="jllm_shape_"))
    baseline = None
    if not args.no_baseline:
        command = [
            sys.executable,
            __file__,
            "--shape",
            args.shape,
            "--num-prompts",
            str(args.num_prompts),
            "--input-len",
            str(args.input_len),
            "--dtype",
            dtype,
            "--baseline-only",
            folder,
        ]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"HF baseline failed:\n{done.stderr[-4000:]}")
        baseline = json.loads(done.stdout.strip().splitlines()[-1])

    from jllm import LLM

    engine_args = EngineArgs.from_cli_args(args)
    engine_args.model, engine_args.load_format, engine_args.dtype = folder, "dummy", dtype
    engine_args.skip_tokenizer_init, engine_args.runner = True, "pooling"
    engine_args.max_model_len = engine_args.max_model_len or max(args.input_len, 512)
    t0 = time.perf_counter()
    llm = LLM(**vars(engine_args))
    startup = time.perf_counter() - t0
    warm = _prompts(args.shape, min(args.num_prompts, 2000), args.input_len, seed=2)
    llm.embed([{"prompt_token_ids": p} for p in warm.tolist()], use_tqdm=False)
    prompts = [{"prompt_token_ids": p} for p in _prompts(args.shape, args.num_prompts, args.input_len, 1).tolist()]
    start = time.perf_counter()
    outputs = llm.embed(prompts, use_tqdm=False)
    elapsed = time.perf_counter() - start
    assert len(outputs) == args.num_prompts and len(outputs[0].outputs.embedding) == SHAPES[args.shape]["hidden_size"]

    record = {
        **run_header(),
        "shape": args.shape,
        "dtype": dtype,
        "num_prompts": args.num_prompts,
        "input_len": args.input_len,
        "max_num_batched_tokens": llm.llm_engine.scheduler_config.max_num_batched_tokens,
        "startup_s": round(startup, 2),
        "elapsed_s": round(elapsed, 3),
        "seqs_per_s": round(args.num_prompts / elapsed, 1),
        "tokens_per_s": round(args.num_prompts * args.input_len / elapsed, 1),
        "hf_baseline": baseline,
    }
    if baseline:
        record["speedup_vs_hf"] = round(record["tokens_per_s"] / baseline["tokens_per_s"], 2)
    os.makedirs(args.results_dir, exist_ok=True)
    name = f"pooling_{args.shape}_{args.input_len}_{record['date']}_{int(time.time())}.json"
    with open(os.path.join(args.results_dir, name), "w") as f:
        json.dump(record, f, indent=1)
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
