"""Offline throughput in the manner of `vllm bench throughput`: random token prompts,
ignore_eos, fixed output length; dummy weights at a real model's shape.

    python scripts/benchmark_throughput.py --shape llama-3.2-1b --num-prompts 64 \
        --input-len 512 --output-len 128 [--hf-baseline] [engine flags]

Prints requests/s and tokens/s and writes a JSON record under scripts/results/.
With --hf-baseline, HF transformers `generate` runs the same shape with random weights
in the same process, as the baseline.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from jllm import LLM, EngineArgs, SamplingParams  # noqa: E402
from jllm.engine.data_parallel import engine_replicas  # noqa: E402
from scripts.bench_utils import run_header  # noqa: E402
from scripts.model_shapes import SHAPES, write_shape  # noqa: E402


def hf_baseline(folder: str, prompts: list[list[int]], output_len: int) -> float:
    """Output tokens/s of HF transformers generate (bf16, one batch, greedy, no EOS stop)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    ids = torch.tensor(prompts, device="cuda")
    kwargs = dict(max_new_tokens=output_len, min_new_tokens=output_len, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        model.generate(ids[:, :8], max_new_tokens=4, do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
        start = time.perf_counter()
        model.generate(ids, **kwargs)
        torch.cuda.synchronize()
    return len(prompts) * output_len / (time.perf_counter() - start)


def _instrument(engine) -> dict:
    """Wraps the engine's phases with wall-clock counters (this script's own bookkeeping).
    With data parallelism, schedule and execute_model add up every replica's (which run at
    the same time), and a step is one step of them all."""
    timers = {"steps": 0, "schedule": 0.0, "execute_model": 0.0, "step_total": 0.0}
    step = engine.step
    lock = threading.Lock()  # replicas step on their own threads

    def timed(name, fn):
        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                with lock:
                    timers[name] += time.perf_counter() - t

        return wrapper

    def counted_step():
        timers["steps"] += 1
        return timed("step_total", step)()

    for replica in engine_replicas(engine):
        replica.scheduler.schedule = timed("schedule", replica.scheduler.schedule)
        replica.runner.execute_model = timed("execute_model", replica.runner.execute_model)
    engine.step = counted_step
    return timers


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__)
    EngineArgs.add_cli_args(parser)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.2-1b")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--hf-baseline", action="store_true")
    parser.add_argument("--results-dir", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args()

    folder = write_shape(args.shape, tempfile.mkdtemp(prefix="jllm_shape_"))
    engine_args = EngineArgs.from_cli_args(args)
    engine_args.model = folder
    engine_args.load_format = "dummy"
    engine_args.skip_tokenizer_init = True
    rng = np.random.default_rng(0)
    vocab = SHAPES[args.shape]["vocab_size"]
    prompts = [rng.integers(0, vocab, args.input_len).tolist() for _ in range(args.num_prompts)]

    t0 = time.perf_counter()
    llm = LLM(**vars(engine_args))
    startup = time.perf_counter() - t0
    params = SamplingParams(temperature=1.0, ignore_eos=True, max_tokens=args.output_len, detokenize=False)
    # A workload of the same shape once untimed, so shapes compiled lazily (enforce_eager,
    # or buckets past max_seq_len_to_capture) do not count; its prompts are fresh so the
    # timed run gets no prefix-cache hits from it.
    warm = [rng.integers(0, vocab, args.input_len).tolist() for _ in range(args.num_prompts)]
    llm.generate([{"prompt_token_ids": p} for p in warm], params, use_tqdm=False)
    timers = _instrument(llm.llm_engine)
    start = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    in_tokens = sum(len(o.prompt_token_ids) for o in outputs)
    record = {
        **run_header(),
        "shape": args.shape,
        "num_prompts": args.num_prompts,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "attention_backend": llm.llm_engine.model_config.attention_backend,
        "tensor_parallel_size": engine_args.tensor_parallel_size,
        "data_parallel_size": engine_args.data_parallel_size,
        "startup_s": round(startup, 2),
        "elapsed_s": round(elapsed, 3),
        "requests_per_s": round(len(outputs) / elapsed, 3),
        "output_tokens_per_s": round(out_tokens / elapsed, 1),
        "total_tokens_per_s": round((in_tokens + out_tokens) / elapsed, 1),
        "num_steps": timers["steps"],
        # Where a step's wall time goes: scheduling, building inputs + device + fetch, the rest.
        "ms_per_step": {k: round(1e3 * v / max(timers["steps"], 1), 3) for k, v in timers.items() if k != "steps"},
    }
    if args.hf_baseline:
        del llm
        record["hf_output_tokens_per_s"] = round(hf_baseline(folder, prompts, args.output_len), 1)
    os.makedirs(args.results_dir, exist_ok=True)
    name = f"throughput_{args.shape}_{record['date']}_{int(time.time())}.json"
    with open(os.path.join(args.results_dir, name), "w") as f:
        json.dump(record, f, indent=1)
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
