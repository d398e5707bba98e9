"""`LLM.get_metrics()`: vLLM's offline metrics (vllm.v1.metrics.reader), on a tiny Llama.

With disable_log_stats=False the offline engine feeds the server's Prometheus stat logger,
so the snapshot holds the same vllm:* series as the server's /metrics; the reference for
every count is the outputs themselves.
"""

import prometheus_client
import pytest

from jllm import LLM, SamplingParams
from jllm.entrypoints.openai.metrics import REQUEST_LATENCY_BUCKETS
from jllm.v1.metrics.reader import Counter, Gauge, Histogram, Metric, Vector, get_metrics_snapshot
from tiny_model import ENGINE_ARGS

PROMPTS = ["Hello, my name is", "The capital of France is", "The future of AI is", "One, two, three,"]
# Different lengths, so requests finish in different steps; one ends at its length cap.
PARAMS = [SamplingParams(temperature=0.0, max_tokens=n) for n in (3, 8, 5, 1)]


def _one(metrics: list[Metric], name: str, **labels) -> Metric:
    found = [m for m in metrics if m.name == name and labels.items() <= m.labels.items()]
    assert len(found) == 1, (name, labels, found)
    return found[0]


@pytest.fixture(scope="module")
def llm(tiny_llama_path) -> LLM:
    return LLM(tiny_llama_path, disable_log_stats=False, **ENGINE_ARGS)


@pytest.fixture(scope="module")
def run(llm):
    """The outputs of one generate call, and the metrics right after it."""
    outputs = llm.generate(PROMPTS, PARAMS, use_tqdm=False)
    return outputs, llm.get_metrics()


def test_token_counters_equal_the_outputs_token_counts(run):
    outputs, metrics = run
    assert _one(metrics, "vllm:prompt_tokens").value == sum(len(o.prompt_token_ids) for o in outputs)
    assert _one(metrics, "vllm:generation_tokens").value == sum(len(c.token_ids) for o in outputs for c in o.outputs)


def test_request_success_counts_each_finished_request_by_its_reason(run):
    outputs, metrics = run
    for reason in ("stop", "length", "abort", "error", "repetition"):
        expected = sum(o.outputs[0].finish_reason == reason for o in outputs)
        assert _one(metrics, "vllm:request_success", finished_reason=reason).value == expected
    assert sum(m.value for m in metrics if m.name == "vllm:request_success") == len(PROMPTS)


def test_e2e_latency_histogram_has_one_cumulative_observation_per_request(run):
    _, metrics = run
    histogram = _one(metrics, "vllm:e2e_request_latency_seconds")
    assert isinstance(histogram, Histogram)
    assert histogram.count == len(PROMPTS) and histogram.sum > 0
    assert list(histogram.buckets) == [str(float(b)) for b in REQUEST_LATENCY_BUCKETS] + ["+Inf"]
    counts = list(histogram.buckets.values())
    assert counts == sorted(counts) and counts[-1] == histogram.count


def test_latency_histograms_count_first_tokens_and_the_tokens_after(run):
    outputs, metrics = run
    assert _one(metrics, "vllm:time_to_first_token_seconds").count == len(PROMPTS)
    # One inter-token latency per token after each request's first.
    after_first = sum(len(o.outputs[0].token_ids) - 1 for o in outputs)
    assert _one(metrics, "vllm:inter_token_latency_seconds").count == after_first
    tokens = _one(metrics, "vllm:request_generation_tokens")
    assert tokens.sum == sum(len(o.outputs[0].token_ids) for o in outputs)


def test_gauges_show_the_engine_idle_after_generate(run):
    _, metrics = run
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"):
        gauge = _one(metrics, name)
        assert isinstance(gauge, Gauge) and gauge.value == 0.0
    assert all(m.name.startswith("vllm:") and isinstance(m.labels, dict) for m in metrics)


def test_parallel_samples_count_their_prompt_once(llm, run):
    before = {m.name: m for m in llm.get_metrics() if isinstance(m, Counter)}
    [output] = llm.generate(PROMPTS[0], SamplingParams(n=2, temperature=1.0, max_tokens=4, seed=0), use_tqdm=False)
    after = {m.name: m for m in llm.get_metrics() if isinstance(m, Counter)}

    def grew(name):
        return after[name].value - before[name].value

    assert grew("vllm:prompt_tokens") == len(output.prompt_token_ids)
    assert grew("vllm:generation_tokens") == sum(len(c.token_ids) for c in output.outputs)


def test_two_llms_do_not_share_counts(tiny_llama_path, llm, run):
    prompt_tokens = _one(llm.get_metrics(), "vllm:prompt_tokens").value
    other = LLM(tiny_llama_path, disable_log_stats=False, **ENGINE_ARGS)
    [output] = other.generate(PROMPTS[1], SamplingParams(temperature=0.0, max_tokens=2), use_tqdm=False)
    assert _one(other.get_metrics(), "vllm:prompt_tokens").value == len(output.prompt_token_ids)
    assert _one(llm.get_metrics(), "vllm:prompt_tokens").value == prompt_tokens


def test_get_metrics_without_stats_raises_vllms_error(tiny_llama_path):
    llm = LLM(tiny_llama_path, **ENGINE_ARGS)  # disable_log_stats defaults to True, as vLLM's LLM
    assert llm.llm_engine.stats_recorder is None  # nothing gathered while generating
    with pytest.raises(AssertionError, match="Stat logging disabled.*disable_log_stats=False"):
        llm.get_metrics()


def test_vllms_metrics_example_runs(tiny_llama_path, capsys):
    """vLLM's examples/offline_inference/metrics.py with `vllm` replaced by `jllm` (and the
    tiny model)."""
    prompts = ["Hello, my name is", "The president of the United States is"]
    sampling_params = SamplingParams(temperature=0.8, top_p=0.95)
    llm = LLM(model=tiny_llama_path, disable_log_stats=False, **ENGINE_ARGS)
    outputs = llm.generate(prompts, sampling_params)
    print("-" * 50)
    for output in outputs:
        print(f"Prompt: {output.prompt!r}\nGenerated text: {output.outputs[0].text!r}")
        print("-" * 50)
    for metric in llm.get_metrics():
        if isinstance(metric, Gauge):
            print(f"{metric.name} (gauge) = {metric.value}")
        elif isinstance(metric, Counter):
            print(f"{metric.name} (counter) = {metric.value}")
        elif isinstance(metric, Vector):
            print(f"{metric.name} (vector) = {metric.values}")
        elif isinstance(metric, Histogram):
            print(f"{metric.name} (histogram)")
            print(f"    sum = {metric.sum}")
            print(f"    count = {metric.count}")
            for bucket_le, value in metric.buckets.items():
                print(f"    {bucket_le} = {value}")

    printed = capsys.readouterr().out
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    assert f"vllm:generation_tokens (counter) = {generated}\n" in printed
    assert "vllm:num_requests_running (gauge) = 0.0\n" in printed
    assert "vllm:e2e_request_latency_seconds (histogram)\n    sum = " in printed
    assert "    +Inf = 2\n" in printed


def test_reader_turns_position_counters_into_a_vector_and_skips_the_rest():
    """vLLM's one Vector (accepted tokens per speculative position); non-vllm metrics and
    collector types the reader has no form for are left out."""
    registry = prometheus_client.CollectorRegistry()
    per_pos = prometheus_client.Counter(
        "vllm:spec_decode_num_accepted_tokens_per_pos", "doc", ["engine", "position"], registry=registry
    )
    per_pos.labels(engine="0", position="0").inc(5)
    per_pos.labels(engine="0", position="2").inc(1)
    prometheus_client.Summary("vllm:a_summary", "doc", registry=registry).observe(1.0)
    prometheus_client.Counter("process_things", "doc", registry=registry).inc()
    assert get_metrics_snapshot(registry) == [
        Vector("vllm:spec_decode_num_accepted_tokens_per_pos", {"engine": "0"}, [5, 0, 1])
    ]


def test_pooling_requests_count_their_prompt_tokens_and_successes(tiny_llama_path):
    args = {**ENGINE_ARGS, "max_num_batched_tokens": ENGINE_ARGS["max_model_len"]}
    llm = LLM(tiny_llama_path, runner="pooling", disable_log_stats=False, **args)
    outputs = llm.embed(PROMPTS, use_tqdm=False)
    metrics = llm.get_metrics()
    assert _one(metrics, "vllm:prompt_tokens").value == sum(len(o.prompt_token_ids) for o in outputs)
    assert _one(metrics, "vllm:generation_tokens").value == 0
    assert _one(metrics, "vllm:request_success", finished_reason="stop").value == len(PROMPTS)
    assert _one(metrics, "vllm:e2e_request_latency_seconds").count == len(PROMPTS)
