"""Where a decode step's time goes, on the GPU: one engine step against its parts.

    python scripts/profile_step.py --shape llama-3.2-1b --batch 64 --context 512

Fills the engine with `--batch` requests of `--context` random prompt tokens (dummy
weights), steps until every request decodes, then times (median of --iters, ms):
  engine.step             the whole step as LLM.generate runs it
  build inputs (host)     the scheduler's rows -> numpy arrays
  jitted step             the fused program (forward + sampling) on built inputs, with
                          their one packed transfer and the fetch of the tokens
  forward, decode kernel  the model forward alone, decode-only (split-K decode kernel)
  forward, ragged kernel  the same forward with the ragged (prefill/mixed) kernel
  sample                  the sampler alone on [batch, vocab] logits, greedy and t=1.0
and the HBM floor of the forward (weight bytes + KV bytes read over the measured copy
bandwidth). Prints a table; nothing is written.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jllm import LLM, SamplingParams  # noqa: E402
from jllm.worker.model_runner import _forward  # noqa: E402
from jllm.layers.sampler import sample  # noqa: E402
from scripts.model_shapes import SHAPES, write_shape  # noqa: E402


def median_ms(fn, iters: int) -> float:
    fn()  # compile / warm
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def copy_tbps() -> float:
    x = jnp.ones((1 << 30,), jnp.bfloat16)  # 2 GiB
    copy = jax.jit(lambda a: a + 1)
    ms = median_ms(lambda: copy(x), 10)
    return 2 * x.nbytes / (ms * 1e-3) / 1e12


def profile_batch(args, folder: str, vocab: int, tbps: float, batch: int) -> tuple:
    """One table row: an engine of `batch` decoding requests, timed whole and in parts."""
    llm = LLM(
        model=folder,
        load_format="dummy",
        skip_tokenizer_init=True,
        dtype="bfloat16",
        max_model_len=args.context + 256,
        max_num_seqs=max(batch, 16),
        enforce_eager=True,
        attention_backend=args.attention_backend,
    )
    engine, runner = llm.llm_engine, llm.llm_engine.runner
    rng = np.random.default_rng(0)
    params = SamplingParams(temperature=1.0, ignore_eos=True, max_tokens=200, detokenize=False)
    for i in range(batch):
        engine.add_request(str(i), {"prompt_token_ids": rng.integers(0, vocab, args.context).tolist()}, params)
    while any(r.num_computed_tokens < r.num_prompt_tokens for r in engine.scheduler.requests.values()):
        engine.step()
    engine.step()
    step_ms = median_ms(engine.step, args.iters)

    # One decode step's inputs, built as execute_model builds them.
    sched = engine.scheduler.schedule()
    runner.builder.update_states(sched)
    build_ms = median_ms(lambda: runner.builder.build(sched), args.iters)
    built = runner.builder.build(sched)
    shape, inputs, md = built.shape, built.inputs, built.sampling
    assert len(built.req_ids) == batch and shape.decode_only == (engine.model_config.attention_backend == "pallas")

    # Packing, the transfer, the fused program and the fetch of the sampled tokens.
    step_only_ms = median_ms(lambda: runner.run_step(shape, inputs, md, batch), args.iters)

    # The pool donated, as in the engine's step: otherwise the K/V write copies it.
    forward = jax.jit(functools.partial(_forward, runner.model), donate_argnums=(1,))
    dev_inputs = jax.device_put(inputs)
    fwd = {}
    for decode_only in (True, False):
        x = dataclasses.replace(dev_inputs, attn=dataclasses.replace(dev_inputs.attn, decode_only=decode_only))

        def run_forward():
            runner.kv_caches, hidden = forward(runner.params, runner.kv_caches, runner.constants, x)
            return hidden

        fwd[decode_only] = median_ms(run_forward, args.iters)
    logits = jax.random.normal(jax.random.key(0), (shape.num_seqs, vocab), jnp.float32)
    sampler = jax.jit(sample, static_argnames=("num_logprobs",))
    dev_md = jax.device_put(md)
    greedy_md = dataclasses.replace(dev_md, temperature=jnp.zeros_like(dev_md.temperature))
    sample_t1 = median_ms(lambda: sampler(logits, dev_md, num_logprobs=0), args.iters)
    sample_greedy = median_ms(lambda: sampler(logits, greedy_md, num_logprobs=0), args.iters)

    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(runner.params))
    spec = runner.spec
    kv_bytes = 2 * spec.num_hidden_layers * spec.num_key_value_heads * spec.head_dim * 2 * batch * args.context
    floor_ms = (weight_bytes + kv_bytes) / (tbps * 1e12) * 1e3
    engine.abort_request([str(i) for i in range(batch)])
    return (batch, step_ms, build_ms, step_only_ms, fwd[True], fwd[False], sample_greedy, sample_t1, floor_ms)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.2-1b")
    parser.add_argument("--batch", type=int, nargs="+", default=[64])
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--attention-backend", default=None)
    args = parser.parse_args()

    folder = write_shape(args.shape, tempfile.mkdtemp(prefix="jllm_shape_"))
    vocab = SHAPES[args.shape]["vocab_size"]
    tbps = copy_tbps()
    # One engine per batch, dropped before the next: each takes most of the device's memory.
    rows_out = [profile_batch(args, folder, vocab, tbps, batch) for batch in args.batch]

    print(
        f"\n{jax.devices()[0].device_kind}, jax {jax.__version__}, {args.shape}, context {args.context}, "
        f"copy {tbps:.2f} TB/s; ms, median of {args.iters}"
    )
    print(
        "| batch | engine.step | build inputs | jitted step | fwd decode kernel | fwd ragged kernel "
        "| sample greedy | sample t=1 | HBM floor |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows_out:
        print("| " + " | ".join([str(r[0])] + [f"{v:.2f}" for v in r[1:]]) + " |")


if __name__ == "__main__":
    main()
