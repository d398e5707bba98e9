"""The offline API as a vLLM user calls it: prompt forms, chat, defaults, outputs."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys

import pytest

from jllm import LLM, SamplingParams, TokensPrompt
from jllm.engine.prompts import bad_words_token_ids
from tiny_model import ENGINE_ARGS

GREEDY = SamplingParams(temperature=0.0, max_tokens=6)


@pytest.fixture(scope="module")
def llm(tiny_llama_path):
    return LLM(model=tiny_llama_path, **ENGINE_ARGS)


def test_every_prompt_form_gives_the_same_greedy_output(llm):
    text = "The capital of France is"
    ids = llm.get_tokenizer().encode(text)
    outputs = llm.generate([text, {"prompt": text}, TokensPrompt(prompt_token_ids=ids), ids], GREEDY, use_tqdm=False)
    assert [o.prompt_token_ids for o in outputs] == [ids] * 4
    assert len({tuple(o.outputs[0].token_ids) for o in outputs}) == 1
    assert outputs[0].prompt == text and outputs[2].prompt is None
    single = llm.generate(ids, GREEDY, use_tqdm=False)  # one list[int] is one prompt
    assert len(single) == 1 and single[0].outputs[0].token_ids == outputs[0].outputs[0].token_ids


def test_outputs_come_back_in_input_order_with_metrics(llm):
    prompts = ["a " * 40, "b", "c " * 10, "d " * 25]
    outputs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert [o.prompt for o in outputs] == prompts
    assert [o.request_id for o in outputs] == sorted((o.request_id for o in outputs), key=int)
    for o in outputs:
        m = o.metrics
        assert o.finished and len(o.outputs[0].token_ids) == 6
        assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time <= m.last_token_time
        assert m.last_token_time <= m.finished_time


def test_use_tqdm_accepts_a_progress_bar_factory(llm):
    made = []

    def factory(*args, **kwargs):
        from tqdm import tqdm

        bar = tqdm(*args, file=io.StringIO(), **kwargs)
        made.append(bar)
        return bar

    llm.generate(["x", "y"], GREEDY, use_tqdm=factory)
    assert len(made) == 1 and made[0].n == 2


def test_chat_renders_the_template_and_generates_like_generate(llm):
    tokenizer = llm.get_tokenizer()
    conversation = [{"role": "user", "content": "Hello, who are you?"}]
    expected_ids = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True)
    expected_ids = list(getattr(expected_ids, "input_ids", expected_ids))
    [out] = llm.chat(conversation, GREEDY, use_tqdm=False)
    assert out.prompt_token_ids == expected_ids
    assert out.prompt.endswith("<|im_start|>assistant\n")
    [direct] = llm.generate(TokensPrompt(prompt_token_ids=expected_ids), GREEDY, use_tqdm=False)
    assert out.outputs[0].token_ids == direct.outputs[0].token_ids
    batch = llm.chat(
        [conversation, conversation + [{"role": "assistant", "content": "I am"}]],
        GREEDY,
        use_tqdm=False,
        add_generation_prompt=False,
        continue_final_message=True,
    )
    assert len(batch) == 2 and batch[1].prompt.rstrip().endswith("I am")


def test_chat_template_override_and_conflicting_flags(llm):
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    [out] = llm.chat(
        [{"role": "user", "content": "hi"}], GREEDY, use_tqdm=False, chat_template=template, add_generation_prompt=False
    )
    assert out.prompt == "[user] hi\n"
    with pytest.raises(ValueError, match="continue_final_message and add_generation_prompt"):
        llm.chat([{"role": "user", "content": "hi"}], GREEDY, continue_final_message=True)


def test_generation_config_supplies_default_sampling_params(tmp_path, tiny_llama_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_llama_path, folder)
    (folder / "generation_config.json").write_text(
        json.dumps({"temperature": 0.6, "top_p": 0.9, "top_k": 20, "max_new_tokens": 7})
    )
    auto = LLM(model=str(folder), **ENGINE_ARGS).get_default_sampling_params()
    assert (auto.temperature, auto.top_p, auto.top_k, auto.max_tokens) == (0.6, 0.9, 20, 7)
    plain = LLM(model=str(folder), generation_config="vllm", **ENGINE_ARGS).get_default_sampling_params()
    assert (plain.temperature, plain.top_p, plain.top_k, plain.max_tokens) == (1.0, 1.0, 0, 16)


def test_skip_tokenizer_init_takes_token_ids_and_returns_no_text(tiny_llama_path):
    llm = LLM(model=tiny_llama_path, skip_tokenizer_init=True, **ENGINE_ARGS)
    assert llm.get_tokenizer() is None
    [out] = llm.generate(
        [{"prompt_token_ids": [5, 6, 7]}], SamplingParams(temperature=0, max_tokens=4, detokenize=False), use_tqdm=False
    )
    assert len(out.outputs[0].token_ids) == 4 and out.outputs[0].text == ""
    with pytest.raises(ValueError, match="skip_tokenizer_init"):
        llm.generate("text needs a tokenizer", use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()


@pytest.mark.slow
def test_generate_script_runs_on_the_default_model(smollm2_gguf_path):
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    result = subprocess.run(
        [
            sys.executable,
            os.path.join(repo, "scripts", "generate.py"),
            "--max-tokens",
            "5",
            "--max-model-len",
            "256",
            "--prompt",
            "The capital of France is",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Prompt: 'The capital of France is'" in result.stdout
    assert "Output: ' Paris" in result.stdout


def test_logits_processors_run_on_the_host_slow_path(llm):
    forced = 1234

    def force(output_ids, logits):  # vLLM V0's (output_ids, logits) form
        logits[:] = -1e9
        logits[forced] = 0.0
        return logits

    def force_with_prompt(prompt_ids, output_ids, logits):
        assert prompt_ids == llm.get_tokenizer().encode("hello there")
        return force(output_ids, logits)

    outputs = llm.generate(
        ["hello there", "hello there"],
        [
            SamplingParams(temperature=0, max_tokens=4, logits_processors=[force]),
            SamplingParams(temperature=0.8, seed=1, max_tokens=4, logits_processors=[force_with_prompt]),
        ],
        use_tqdm=False,
    )
    assert [o.outputs[0].token_ids for o in outputs] == [[forced] * 4, [forced] * 4]


def test_bad_words_are_never_generated(llm):
    tokenizer = llm.get_tokenizer()
    [plain] = llm.generate("Once upon a time", SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)

    # A generated token that is a whole bad word under vLLM's rule (the word stripped
    # of leading spaces, and its spaced form where that is one token of the same count).
    def bans(token):
        words = bad_words_token_ids(SamplingParams(bad_words=[tokenizer.decode([token])]), tokenizer, 49152)
        return [token] in words

    token = next(t for t in plain.outputs[0].token_ids if bans(t))
    params = SamplingParams(temperature=0, max_tokens=8, bad_words=[tokenizer.decode([token])])
    [banned] = llm.generate("Once upon a time", params, use_tqdm=False)
    assert token not in banned.outputs[0].token_ids
    assert banned.outputs[0].token_ids != plain.outputs[0].token_ids


def test_truncate_prompt_tokens_keeps_the_last_tokens(llm):
    ids = list(range(100, 140))
    [out] = llm.generate(ids, SamplingParams(temperature=0, max_tokens=3, truncate_prompt_tokens=10), use_tqdm=False)
    assert out.prompt_token_ids == ids[-10:]
    [direct] = llm.generate(ids[-10:], SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)
    assert out.outputs[0].token_ids == direct.outputs[0].token_ids


def test_extreme_but_valid_sampling_lists_cannot_stop_the_engine(llm):
    """Values the validators accept but the step's arrays must survive: a top_k beyond
    the vocabulary (keeps every token, as 0 does), two million repeats of one allowed
    id, and the same stop token listed many times with min_tokens."""
    prompt = "The capital of France is"
    seeded = dict(temperature=1.0, seed=11, max_tokens=5)
    [no_top_k] = llm.generate(prompt, SamplingParams(top_k=0, **seeded), use_tqdm=False)
    [huge_top_k] = llm.generate(prompt, SamplingParams(top_k=2**40, **seeded), use_tqdm=False)
    assert huge_top_k.outputs[0].token_ids == no_top_k.outputs[0].token_ids

    [allowed] = llm.generate(prompt, SamplingParams(allowed_token_ids=[321] * 2_000_000, **seeded), use_tqdm=False)
    assert list(allowed.outputs[0].token_ids) == [321] * 5

    [stops] = llm.generate(
        prompt, SamplingParams(stop_token_ids=[321] * 100_000, min_tokens=5, **seeded), use_tqdm=False
    )
    assert len(stops.outputs[0].token_ids) == 5
    llm.llm_engine.scheduler.block_manager.check_no_leaks()
