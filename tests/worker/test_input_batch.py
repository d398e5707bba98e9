"""The step's host inputs: the vectorized builder, which knows requests only from the
scheduler's messages and its own samples, against a per-row reference (each row's
arrays derived from the scheduler's request alone), over a randomized scheduler run
with chunked prefills, prefix-cache hits, preemption and finishes; and the one-buffer
packing against the arrays it carries.
"""

import random

import jax
import numpy as np

from jllm.config import CacheConfig, SchedulerConfig
from jllm.core.scheduler import Scheduler
from jllm.engine.request import Request, RequestStatus
from jllm.engine.sampling_settings import sampling_settings
from jllm.sampling_params import SamplingParams
from jllm.worker.attention_plan import AttentionPath, AttentionPlanner
from jllm.worker.buckets import pow2_buckets
from jllm.worker.input_batch import InputBatchBuilder
from jllm.worker.packing import pack, unpack
from pallas_kernels import decode_config

BLOCK_SIZE = 4
MAX_MODEL_LEN = 64
VOCAB_SIZE = 1000


def make_request(request_id, prompt, params, seed):
    return Request(
        request_id,
        prompt,
        params,
        seed=seed,
        max_tokens=params.max_tokens,
        sampling_settings=sampling_settings(params, seed),
    )


def make_builder(*, block_size, token_buckets, max_num_seqs, page_buckets, max_logprobs=0, **planner):
    planner = AttentionPlanner(block_size=block_size, token_buckets=token_buckets, max_num_seqs=max_num_seqs, **planner)
    return InputBatchBuilder(
        planner=planner, page_buckets=page_buckets, max_logprobs=max_logprobs, vocab_size=VOCAB_SIZE
    )


def reference_inputs(scheduler, req_ids, num_scheduled, T, S, P):
    """Each row's tokens, positions, pages and sampling settings from the scheduler's request alone."""
    input_ids, positions, slots = np.zeros(T, np.int32), np.zeros(T, np.int32), np.full(T, -1, np.int32)
    block_tables, seq_lens = np.zeros((S, P), np.int32), np.zeros(S, np.int32)
    temperature, top_k = np.zeros(S, np.float32), np.zeros(S, np.int32)
    seed_lo, step, samples = np.zeros(S, np.uint32), np.zeros(S, np.int32), np.zeros(S, bool)
    start = 0
    for i, req_id in enumerate(req_ids):
        req, n = scheduler.requests[req_id], num_scheduled[req_id]
        done = req.num_computed_tokens - n  # the scheduler has advanced it past this step
        pos = np.arange(done, done + n)
        blocks = np.asarray(req.block_ids)
        input_ids[start : start + n] = req.all_token_ids[done : done + n]
        positions[start : start + n] = pos
        slots[start : start + n] = blocks[pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE
        block_tables[i, : len(blocks)] = blocks
        seq_lens[i] = done + n
        temperature[i], top_k[i] = req.sampling_params.temperature, req.sampling_params.top_k
        seed_lo[i] = req.seed & 0xFFFFFFFF
        samples[i] = done + n == req.num_tokens
        step[i] = req.num_output_tokens
        start += n
    return dict(
        input_ids=input_ids,
        positions=positions,
        slot_mapping=slots,
        block_tables=block_tables,
        seq_lens=seq_lens,
        temperature=temperature,
        top_k=top_k,
        seed_lo=seed_lo,
    ), (step, samples)


def test_builder_matches_the_per_row_reference_through_chunks_hits_preemption_and_finishes():
    rng = random.Random(0)
    # Few pages, so that requests get preempted and come back.
    scheduler = Scheduler(SchedulerConfig(32, 6, MAX_MODEL_LEN), CacheConfig(BLOCK_SIZE, 20, True))
    builder = make_builder(
        block_size=BLOCK_SIZE,
        token_buckets=pow2_buckets(8, 32),
        max_num_seqs=6,
        page_buckets=pow2_buckets(4, MAX_MODEL_LEN // BLOCK_SIZE),
        max_logprobs=5,
    )
    shared_prefix = [rng.randrange(VOCAB_SIZE) for _ in range(12)]
    num_added = num_checked_rows = 0
    for step_index in range(120):
        if num_added < 24 and rng.random() < 0.4:
            prompt = (shared_prefix if rng.random() < 0.5 else []) + [
                rng.randrange(VOCAB_SIZE) for _ in range(rng.randint(1, 20))
            ]
            params = SamplingParams(
                temperature=rng.choice([0.0, 0.7]), top_k=rng.choice([0, 5]), max_tokens=rng.randint(1, 30)
            )
            scheduler.add_request(make_request(f"r{num_added}", prompt, params, rng.getrandbits(64)))
            num_added += 1
        sched = scheduler.schedule()
        builder.update_states(sched)
        if sched.is_empty:
            continue
        batch = builder.build(sched)
        shape, inputs, md = batch.shape, batch.inputs, batch.sampling
        expected, (step, samples) = reference_inputs(
            scheduler, batch.req_ids, sched.num_scheduled_tokens, shape.num_tokens, shape.num_seqs, shape.num_pages
        )
        got = dict(
            input_ids=inputs.input_ids,
            positions=inputs.attn.positions,
            slot_mapping=inputs.attn.slot_mapping,
            block_tables=inputs.attn.block_tables,
            seq_lens=inputs.attn.seq_lens,
            temperature=md.temperature,
            top_k=md.top_k,
            seed_lo=md.seed_lo,
        )
        for name, want in expected.items():
            np.testing.assert_array_equal(got[name], want, err_msg=f"{name} at step {step_index}")
        assert sorted(batch.req_ids) == sorted(sched.num_scheduled_tokens)
        np.testing.assert_array_equal(batch.samples, samples[: len(batch.req_ids)])
        # The output position matters only where the row samples.
        np.testing.assert_array_equal(md.step[samples], step[samples])
        num_checked_rows += len(batch.req_ids)

        sampled = np.asarray([rng.randrange(VOCAB_SIZE) for _ in range(shape.num_seqs)], np.int32)
        builder.record_sampled(batch, sampled)
        tokens = {req_id: int(t) for req_id, t, s in zip(batch.req_ids, sampled, batch.samples) if s}
        for req in scheduler.update_from_output(sched, tokens):
            if req.num_output_tokens >= req.max_tokens:
                scheduler.finish_requests(req.request_id, RequestStatus.FINISHED_LENGTH_CAPPED)
    assert scheduler.num_preemptions > 0 and scheduler.block_manager.prefix_cache_stats.hits > 0
    assert num_checked_rows > 200


def test_pack_carries_every_array_bit_for_bit_through_jit():
    rng = np.random.default_rng(0)
    tree = {
        "ids": rng.integers(-5, 5, (3, 4)).astype(np.int32),
        "x": rng.normal(size=7).astype(np.float32),
        "seed": np.asarray([0, 2**32 - 1], np.uint32),
        "mask": np.asarray([True, False, True]),
        "empty": np.zeros((3, 0), np.int32),
    }
    buffer, layout = pack(tree)
    assert buffer.dtype == np.int32 and buffer.ndim == 1
    out = jax.jit(unpack, static_argnums=1)(buffer, layout)
    for name, want in tree.items():
        assert out[name].dtype == want.dtype and out[name].shape == want.shape
        np.testing.assert_array_equal(np.asarray(out[name]), want)


def test_decode_steps_split_for_the_smallest_batch_of_their_bucket():
    block_size, pages = 16, 512  # 8192-token page tables.
    builder = make_builder(
        block_size=block_size,
        token_buckets=pow2_buckets(16, 512),
        max_num_seqs=256,
        page_buckets=(pages,),
        decode_kernel=True,
        head_dim=64,
    )
    planner = builder.planner
    # A lone sequence decodes in the 16-row bucket: it gets batch 1's splits, not the
    # padded batch's (one split, one program per kv head over the whole context).
    assert planner.decode_config(16, pages) == decode_config(1, 8192, 64)
    assert decode_config(1, 8192, 64).num_splits > decode_config(16, 8192, 64).num_splits
    assert planner.decode_config(32, pages) == decode_config(17, 8192, 64)
    assert planner.decode_config(256, pages) == decode_config(129, 8192, 64)

    # Through build(): a prompt's step is not decode-only; the next step is, and carries
    # its bucket's split count as static metadata.
    scheduler = Scheduler(SchedulerConfig(512, 256, 8192), CacheConfig(block_size, 1024, False))
    scheduler.add_request(make_request("r", [1, 2, 3], SamplingParams(max_tokens=4), 0))
    for expect_decode in (False, True):
        sched = scheduler.schedule()
        builder.update_states(sched)
        batch = builder.build(sched)
        shape, inputs = batch.shape, batch.inputs
        assert inputs.attn.decode_only == expect_decode
        want = planner.decode_config(shape.num_tokens, shape.num_pages) if expect_decode else None
        assert inputs.attn.decode_config == want
        builder.record_sampled(batch, np.zeros(shape.num_seqs, np.int32))
        scheduler.update_from_output(sched, {"r": 7})


def test_prefix_prefill_is_chosen_only_where_cudnn_saves_more_than_the_gather_costs():
    # Llama's 4 query heads per kv head, 16-token pages. A 512-token chunk over 512 cached
    # tokens attends 512 * 768 pairs: its gather pays up to 1.25e-3 * 4 * 393216 = 1966
    # table tokens.
    planner = AttentionPlanner(
        block_size=16,
        token_buckets=pow2_buckets(16, 512),
        max_num_seqs=8,
        fresh_prefill_min_tokens=512,
        num_queries_per_kv=4,
    )
    assert planner.plan(1, 512, 512, 122, 512).prefix_prefill  # 1952 table tokens
    assert not planner.plan(1, 512, 512, 123, 512).prefix_prefill  # 1968
    # A long chunk over a long prefix pays for a 128k-token table.
    assert planner._prefix_prefill_pays(8192, 8192, 8192)
    planner.num_queries_per_kv = 1  # Without GQA the gather is 4x larger per pair.
    assert not planner.plan(1, 512, 512, 122, 512).prefix_prefill
    # A chunk with nothing cached is a fresh prefill; two rows or a small bucket, neither.
    assert planner.plan(1, 512, 512, 122, 0).fresh_prefill
    assert planner.plan(2, 512, 512, 122, 0) == planner.plan(1, 256, 256, 122, 0) == AttentionPath()
