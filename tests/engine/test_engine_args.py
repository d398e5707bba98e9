"""Engine arguments and request validation: every error's message (vLLM's where vLLM has
one), raised before anything runs; and the --kebab-case command line round trip."""

import argparse
import dataclasses
import re

import jax.numpy as jnp
import pytest

from jllm import LLM, SamplingParams
from jllm.engine.arg_utils import EngineArgs
from tiny_model import ENGINE_ARGS, MAX_MODEL_LEN


def raises(message: str):
    """pytest.raises(ValueError) whose message starts with `message`, taken literally."""
    return pytest.raises(ValueError, match="^" + re.escape(message))


# ----- EngineArgs.validate ----------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"dtype": "int8"},
            "Unknown dtype: 'int8'. Supported: ['auto', 'half', 'float16', 'bfloat16', 'float', 'float32']",
        ),
        ({"tokenizer_mode": "fast"}, "Unknown tokenizer mode: fast. Must be one of ['auto', 'slow', 'mistral']."),
        (
            {"load_format": "pt"},
            "Unknown load_format: 'pt'. Supported: ['auto', 'safetensors', 'gguf', 'orbax', 'dummy']",
        ),
        ({"attention_backend": "flash"}, "Unknown attention_backend: 'flash'. Supported: ['reference', 'pallas']"),
        ({"gpu_memory_utilization": 0.0}, "GPU memory utilization must be within (0, 1]. Got 0.0."),
        ({"gpu_memory_utilization": 1.5}, "GPU memory utilization must be within (0, 1]. Got 1.5."),
        ({"block_size": 24}, "block_size must be one of [1, 8, 16, 32, 64, 128], got 24."),
        ({"max_model_len": 0}, "max_model_len must be a positive integer, got 0."),
        ({"max_num_batched_tokens": -1}, "max_num_batched_tokens must be a positive integer, got -1."),
        ({"max_num_seqs": 0}, "max_num_seqs must be a positive integer, got 0."),
        ({"num_gpu_blocks_override": 0}, "num_gpu_blocks_override must be a positive integer, got 0."),
        ({"kv_cache_memory_bytes": 0}, "kv_cache_memory_bytes must be a positive integer, got 0."),
        ({"max_logprobs": -2}, "max_logprobs must be non-negative or -1, got -2."),
        ({"max_seq_len_to_capture": 0}, "max_seq_len_to_capture must be positive, got 0."),
    ],
)
def test_engine_args_validation_message(kwargs, message):
    with raises(message):
        EngineArgs(model="unused", **kwargs)
    # The same check guards LLM(...), before any file is read.
    with raises(message):
        LLM(model="/nonexistent", **kwargs)


# ----- building the engine -----------------------------------------------------------


def test_max_model_len_above_the_models_is_rejected(tiny_llama_path):
    with raises(
        "User-specified max_model_len (4096) is greater than the derived max_model_len "
        "(max_position_embeddings=2048 in model's config.json)."
    ):
        LLM(model=tiny_llama_path, max_model_len=4096)


def test_a_config_without_a_context_length_needs_max_model_len(tiny_llama_path):
    # transformers' Llama config always has the field, so 0 stands in for "not stated".
    with raises("The model config has no max_position_embeddings; pass max_model_len."):
        LLM(model=tiny_llama_path, hf_overrides={"max_position_embeddings": 0})


def test_unknown_compilation_config_keys_are_rejected(tiny_llama_path):
    with raises(
        "Unknown compilation_config keys ['capture_sizes']; "
        "supported: cudagraph_capture_sizes, token_buckets, cache_dir."
    ):
        LLM(model=tiny_llama_path, max_model_len=MAX_MODEL_LEN, compilation_config={"capture_sizes": [1]})


def test_unsupported_architecture_names_the_supported_ones(tiny_llama_path):
    message = "Model architectures ['FalconForCausalLM'] are not supported for now. Supported architectures: ["
    with raises(message) as info:
        LLM(model=tiny_llama_path, hf_overrides={"architectures": ["FalconForCausalLM"]})
    assert "'LlamaForCausalLM'" in str(info.value) and "'Qwen3ForCausalLM'" in str(info.value)


KV_POOL_TOO_SMALL = (
    "To serve at least one request with the models's max seq len (320), (0.00 GiB KV cache is needed, "
    "which is larger than the available KV cache memory (0.00 GiB). Based on the available memory, "
    "the estimated maximum model length is 64. Try increasing `gpu_memory_utilization` or decreasing "
    "`max_model_len` when initializing the engine."
)


def test_a_pool_of_too_few_pages_is_rejected(tiny_llama_path):
    with raises(KV_POOL_TOO_SMALL):
        LLM(model=tiny_llama_path, max_model_len=MAX_MODEL_LEN, num_gpu_blocks_override=4)


def test_too_few_kv_cache_bytes_are_rejected(tiny_llama_path):
    # A page holds 2 (K, V) x 2 layers x 2 KV heads x 16 tokens x 16 dims x 4 bytes.
    page_bytes = 2 * 2 * 2 * 16 * 16 * 4
    with raises(KV_POOL_TOO_SMALL):
        LLM(model=tiny_llama_path, max_model_len=MAX_MODEL_LEN, kv_cache_memory_bytes=4 * page_bytes + 1)


def test_no_memory_left_for_the_pool_is_rejected(tiny_llama_path, monkeypatch):
    # What an accelerator reports when weights and activations fill its budget.
    monkeypatch.setattr("jllm.worker.kv_cache.available_kv_cache_bytes", lambda *args: -1)
    with raises(
        "No available memory for the cache blocks. Try increasing `gpu_memory_utilization` "
        "when initializing the engine."
    ):
        LLM(model=tiny_llama_path, max_model_len=MAX_MODEL_LEN)


def test_fewer_batched_tokens_than_sequences_is_rejected(tiny_llama_path):
    with raises("max_num_batched_tokens (8) must be greater than or equal to max_num_seqs (16)."):
        LLM(model=tiny_llama_path, max_model_len=MAX_MODEL_LEN, max_num_batched_tokens=8, max_num_seqs=16)


def test_without_chunked_prefill_the_token_budget_must_hold_max_model_len(tiny_llama_path):
    with raises(
        "max_num_batched_tokens (64) is smaller than max_model_len (320). This effectively "
        "limits the maximum sequence length to max_num_batched_tokens and makes jllm reject "
        "longer sequences. Please increase max_num_batched_tokens or decrease max_model_len."
    ):
        LLM(model=tiny_llama_path, max_model_len=MAX_MODEL_LEN, max_num_batched_tokens=64, enable_chunked_prefill=False)


# ----- requests -------------------------------------------------------------------


GREEDY = SamplingParams(temperature=0.0, max_tokens=4)


@pytest.fixture(scope="module")
def llm(tiny_llama_path):
    return LLM(model=tiny_llama_path, **ENGINE_ARGS)


@pytest.fixture
def nothing_may_run(llm, monkeypatch):
    """Fails the test if the model runs; afterwards nothing may be queued or hold pages."""
    original = llm.llm_engine.runner.execute_model

    def execute_model(scheduler_output):
        if not scheduler_output.is_empty:
            raise AssertionError("the model ran")
        return original(scheduler_output)

    monkeypatch.setattr(llm.llm_engine.runner, "execute_model", execute_model)
    yield
    assert not llm.llm_engine.has_unfinished_requests()
    llm.llm_engine.scheduler.block_manager.check_no_leaks()


def test_a_prompt_longer_than_max_model_len_is_rejected_before_anything_runs(llm, nothing_may_run):
    too_long = list(range(100, 100 + MAX_MODEL_LEN + 1))
    with raises(
        f"The decoder prompt (length {MAX_MODEL_LEN + 1}) is longer than the maximum model length of {MAX_MODEL_LEN}."
    ):
        llm.generate([[100, 101, 102], too_long], GREEDY, use_tqdm=False)


def test_a_text_prompt_longer_than_max_model_len_is_rejected(llm, nothing_may_run):
    text = "hello world " * MAX_MODEL_LEN
    length = len(llm.get_tokenizer().encode(text))
    with raises(f"The decoder prompt (length {length}) is longer than the maximum model length of {MAX_MODEL_LEN}."):
        llm.generate(text, GREEDY, use_tqdm=False)


@pytest.mark.parametrize("prompt", ["", {"prompt_token_ids": []}], ids=["text", "token_ids"])
def test_an_empty_prompt_is_rejected_before_anything_runs(llm, nothing_may_run, prompt):
    with raises("The decoder prompt cannot be empty"):
        llm.generate(["A fine prompt", prompt], GREEDY, use_tqdm=False)


def test_one_sampling_params_per_prompt_or_the_lengths_must_match(llm, nothing_may_run):
    with raises("The lengths of prompts and sampling_params must be the same."):
        llm.generate(["a", "b", "c"], [GREEDY, GREEDY], use_tqdm=False)


def test_a_prompt_that_fills_max_model_len_gets_one_token(llm):
    [output] = llm.generate([list(range(100, 100 + MAX_MODEL_LEN))], GREEDY, use_tqdm=False)
    assert len(output.outputs[0].token_ids) == 1
    assert output.outputs[0].finish_reason == "length"
    llm.llm_engine.scheduler.block_manager.check_no_leaks()


# ----- command line -----------------------------------------------------------------


def parse(argv: list[str]) -> EngineArgs:
    parser = EngineArgs.add_cli_args(argparse.ArgumentParser())
    return EngineArgs.from_cli_args(parser.parse_args(argv))


def test_every_engine_argument_has_a_kebab_case_flag():
    parser = EngineArgs.add_cli_args(argparse.ArgumentParser())
    flags = {s for action in parser._actions for s in action.option_strings}
    for field in dataclasses.fields(EngineArgs):
        assert "--" + field.name.replace("_", "-") in flags


def test_no_flags_give_the_default_engine_args():
    assert parse([]) == EngineArgs()


def test_flags_round_trip_into_engine_args():
    args = parse(
        [
            "--model",
            "some/model",
            "--tokenizer",
            "some/tokenizer",
            "--tokenizer-mode",
            "slow",
            "--dtype",
            "bfloat16",
            "--seed",
            "3",
            "--max-model-len",
            "320",
            "--block-size",
            "32",
            "--no-enable-prefix-caching",
            "--gpu-memory-utilization",
            "0.5",
            "--kv-cache-memory-bytes",
            "1000000",
            "--num-gpu-blocks-override",
            "100",
            "--max-num-batched-tokens",
            "64",
            "--max-num-seqs",
            "8",
            "--no-enable-chunked-prefill",
            "--enforce-eager",
            "--max-seq-len-to-capture",
            "256",
            "--compilation-config",
            '{"token_buckets": [16, 32]}',
            "--hf-overrides",
            '{"rope_theta": 5.0}',
            "--max-logprobs",
            "5",
            "--generation-config",
            "vllm",
            "--load-format",
            "dummy",
            "--attention-backend",
            "reference",
            "--trust-remote-code",
            "--skip-tokenizer-init",
            "--served-model-name",
            "served",
            "--revision",
            "main",
            "--no-disable-log-stats",
        ]
    )
    assert args == EngineArgs(
        model="some/model",
        tokenizer="some/tokenizer",
        tokenizer_mode="slow",
        dtype="bfloat16",
        seed=3,
        max_model_len=320,
        block_size=32,
        enable_prefix_caching=False,
        gpu_memory_utilization=0.5,
        kv_cache_memory_bytes=1000000,
        num_gpu_blocks_override=100,
        max_num_batched_tokens=64,
        max_num_seqs=8,
        enable_chunked_prefill=False,
        enforce_eager=True,
        max_seq_len_to_capture=256,
        compilation_config={"token_buckets": [16, 32]},
        hf_overrides={"rope_theta": 5.0},
        max_logprobs=5,
        generation_config="vllm",
        load_format="dummy",
        attention_backend="reference",
        trust_remote_code=True,
        skip_tokenizer_init=True,
        served_model_name="served",
        revision="main",
        disable_log_stats=False,
    )


def test_boolean_flags_have_both_forms():
    assert parse(["--enable-prefix-caching"]).enable_prefix_caching is True
    assert parse(["--no-enable-prefix-caching"]).enable_prefix_caching is False
    assert parse(["--no-enforce-eager"]).enforce_eager is False
    assert parse([]).enforce_eager is None  # the platform decides


def test_a_flag_outside_its_choices_is_a_usage_error(capsys):
    with pytest.raises(SystemExit):
        parse(["--dtype", "int8"])
    assert "invalid choice: 'int8'" in capsys.readouterr().err


def test_activation_bound_covers_a_prefix_prefill_steps_gather():
    """Where lone prompt chunks run cuDNN, the KV budget leaves room for a prefix-prefill
    step's table-wide K/V gather and its float32 merge, on top of the usual bound."""
    from jllm.config import SchedulerConfig
    from jllm.worker.kv_cache import activation_bytes as _activation_bytes
    from jllm.models.llama import DecoderSpec

    spec = DecoderSpec(
        vocab_size=1000,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=32,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
    )
    sched = SchedulerConfig(max_num_batched_tokens=512, max_num_seqs=16, max_model_len=4096)
    plain = _activation_bytes(spec, sched, jnp.bfloat16)
    gather = 2 * 4096 * 2 * 32 * 2  # K and V, 4096 tokens, 2 kv heads of 32, bf16
    merge = 3 * 512 * 8 * 32 * 4  # three float32 [tokens, q heads, head_dim]
    assert _activation_bytes(spec, sched, jnp.bfloat16, 4096) == plain + 2 * (gather + merge)
