"""Where a decode step's host time goes, on the CPU, with the device's work stubbed out.

    python scripts/profile_host.py --batch 64 256 --context 512 [--detokenize] [--cprofile 25]

Builds an engine on a tiny dummy-weight Llama, adds `--batch` requests of `--context`
random prompt tokens (ignore_eos), steps until every request decodes, then replaces
the runner's jitted step with a stub that answers at once with random tokens of the
right shape. What is left of `engine.step` is the host's work per step; its CPU time
(not wall-clock, so that other processes on a shared machine count less) is measured
whole, then broken down (ms per step, median, min or mean of --steps):
  schedule            Scheduler.schedule
  build inputs        InputBatchBuilder.build (the scheduler's message -> numpy)
  rest of runner      execute_model around build and the stub: packing, results to host
  update_from_output  Scheduler.update_from_output
  output processing   the engine's per-token work: stop checks, detokenizing, logprobs
  make outputs        the RequestOutputs (RequestState.make_output)
  rest of step        everything else in LLMEngine.step
With --cprofile K, cProfile runs over the same number of steps and the top K functions
by own time are printed. Nothing is written.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from jllm import EngineArgs, SamplingParams  # noqa: E402
from jllm.engine.llm_engine import LLMEngine  # noqa: E402
from jllm.sampling_params import RequestOutputKind  # noqa: E402

# The host's own CPU time: on a shared machine it does not count the time another
# process held the core, as wall-clock time would (the stubbed step never waits).
CLOCK = time.thread_time

STATS = {"median": statistics.median, "min": min, "mean": statistics.mean}

# SmolLM2's vocabulary, so that --detokenize can use its tokenizer on the sampled ids.
VOCAB_SIZE = 49152
TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": VOCAB_SIZE,
    "rms_norm_eps": 1e-5,
    "max_position_embeddings": 8192,
    "tie_word_embeddings": False,
    "eos_token_id": 2,
}


class DeviceStub:
    """Stands in for the runner's jitted step: the step's shape comes from the last
    `build`, the answer is random tokens, and no time is spent on a device."""

    def __init__(self, runner, seed: int = 0):
        self.kv_caches = runner.kv_caches
        self.rng = np.random.default_rng(seed)
        self.num_seqs = 0
        build = runner.builder.build

        def recording_build(*args, **kwargs):
            built = build(*args, **kwargs)
            self.num_seqs = built.shape.num_seqs
            return built

        runner.builder.build = recording_build

    def __call__(self, *args, **kwargs):
        tokens = self.rng.integers(3, VOCAB_SIZE, self.num_seqs, dtype=np.int32)
        return self.kv_caches, tokens, None, None


class PhaseTimers:
    """CPU time of wrapped callables by phase name, step by step."""

    def __init__(self):
        self.current: dict[str, float] = {}
        self.steps: list[dict[str, float]] = []

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            start = CLOCK()
            try:
                return fn(*args, **kwargs)
            finally:
                self.current[name] = self.current.get(name, 0.0) + CLOCK() - start

        return timed

    def end_step(self) -> None:
        self.steps.append(self.current)
        self.current = {}

    def ms(self, name: str, stat) -> float:
        return 1e3 * stat([step.get(name, 0.0) for step in self.steps])


def max_tokens_for(steps: int) -> int:
    """Enough for the fill's decodes (up to 16 steps of prefill at batch 256) and
    three passes of `steps`: no request finishes while the host is timed."""
    return 3 * steps + 64


def build_engine(batch: int, context: int, steps: int, detokenize: bool) -> LLMEngine:
    folder = tempfile.mkdtemp(prefix="jllm_tiny_")
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(TINY_LLAMA, f)
    tokenizer = None
    if detokenize:
        from jllm.models.loader.default_model import get_default_model_path

        tokenizer = get_default_model_path()
    max_model_len = context + max_tokens_for(steps)
    pages_per_seq = -(-max_model_len // 16)
    args = EngineArgs(
        model=folder,
        tokenizer=tokenizer,
        skip_tokenizer_init=not detokenize,
        load_format="dummy",
        max_model_len=max_model_len,
        max_num_seqs=batch,
        max_num_batched_tokens=max(8192, batch),
        num_gpu_blocks_override=batch * pages_per_seq + 16,
        enforce_eager=True,
        seed=0,
    )
    return LLMEngine.from_engine_args(args)


def fill(
    engine: LLMEngine, batch: int, context: int, max_tokens: int, detokenize: bool, output_kind: RequestOutputKind
) -> None:
    """Adds the requests and steps until every one of them decodes."""
    rng = np.random.default_rng(0)
    params = SamplingParams(
        temperature=1.0, ignore_eos=True, max_tokens=max_tokens, detokenize=detokenize, output_kind=output_kind
    )
    for i in range(batch):
        engine.add_request(str(i), {"prompt_token_ids": rng.integers(3, VOCAB_SIZE, context).tolist()}, params)
    requests = engine.scheduler.requests.values()
    while any(r.num_computed_tokens < r.num_prompt_tokens for r in requests):
        engine.step()
    engine.step()


def time_steps(engine: LLMEngine, steps: int, stat=statistics.median) -> float:
    """ms of an un-instrumented engine.step (`stat` over the steps)."""
    times = []
    for _ in range(steps):
        start = CLOCK()
        engine.step()
        times.append(CLOCK() - start)
    return 1e3 * stat(times)


def phase_breakdown(engine: LLMEngine, steps: int, stat=statistics.median) -> dict[str, float]:
    """ms per step of each phase (`stat` over the steps; see the module docstring)."""
    timers = PhaseTimers()
    runner, scheduler = engine.runner, engine.scheduler
    saved = (scheduler.schedule, scheduler.update_from_output, runner.execute_model, runner.builder.build, runner._step)
    step = timers.wrap("step", engine.step)
    scheduler.schedule = timers.wrap("schedule", scheduler.schedule)
    scheduler.update_from_output = timers.wrap("update_from_output", scheduler.update_from_output)
    runner.execute_model = timers.wrap("runner", runner.execute_model)
    runner.builder.build = timers.wrap("build inputs", runner.builder.build)
    runner._step = timers.wrap("device (stub)", runner._step)
    engine._process_sampled = timers.wrap("output processing", engine._process_sampled)
    engine._make_outputs = timers.wrap("make outputs", engine._make_outputs)
    try:
        for _ in range(steps):
            step()
            timers.end_step()
    finally:
        (scheduler.schedule, scheduler.update_from_output, runner.execute_model, runner.builder.build, runner._step) = (
            saved
        )
        del engine._process_sampled, engine._make_outputs
    ms = {name: timers.ms(name, stat) for name in timers.steps[0]}
    ms["rest of runner"] = ms.pop("runner") - ms["build inputs"] - ms["device (stub)"]
    accounted = (
        "schedule",
        "build inputs",
        "rest of runner",
        "device (stub)",
        "update_from_output",
        "output processing",
        "make outputs",
    )
    ms["rest of step"] = ms["step"] - sum(ms.get(k, 0.0) for k in accounted)
    ms["host total"] = ms.pop("step") - ms["device (stub)"]
    return ms


def top_functions(engine: LLMEngine, steps: int, count: int) -> str:
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(steps):
        engine.step()
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(count)
    return text.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[256])
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--detokenize", action="store_true", help="SmolLM2's tokenizer, detokenize=True")
    parser.add_argument("--output-kind", choices=[k.name for k in RequestOutputKind], default="CUMULATIVE")
    parser.add_argument(
        "--stat",
        choices=sorted(STATS),
        default="median",
        help="of the steps' times; min is steadier where other processes share the cores, "
        "mean counts the garbage collector's pauses",
    )
    parser.add_argument("--cprofile", type=int, default=0, metavar="K", help="print the top K functions")
    args = parser.parse_args()

    order = (
        "schedule",
        "build inputs",
        "rest of runner",
        "update_from_output",
        "output processing",
        "make outputs",
        "rest of step",
        "host total",
    )
    results = []
    for batch in args.batch:
        engine = build_engine(batch, args.context, args.steps, args.detokenize)
        runner = engine.runner
        runner._step = DeviceStub(runner)
        fill(
            engine,
            batch,
            args.context,
            max_tokens_for(args.steps),
            args.detokenize,
            RequestOutputKind[args.output_kind],
        )
        stat = STATS[args.stat]
        time_steps(engine, 2)
        step_ms = time_steps(engine, args.steps, stat)
        parts = phase_breakdown(engine, args.steps, stat)
        results.append((batch, step_ms, parts))
        if args.cprofile:
            print(f"\n--- batch {batch}: cProfile over {args.steps} steps ---")
            print(top_functions(engine, args.steps, args.cprofile))

    print(
        f"\nHost ms per decode step (device stubbed), context {args.context}, detokenize={args.detokenize}, "
        f"output_kind={args.output_kind}, {args.stat} of {args.steps} steps"
    )
    print("| batch | engine.step | " + " | ".join(order) + " |")
    print("| --- " * (len(order) + 2) + "|")
    for batch, step_ms, parts in results:
        cells = [f"{parts.get(k, 0.0):.3f}" for k in order]
        print(f"| {batch} | {step_ms:.3f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
