"""jllm against HF transformers: greedy tokens exact in float32, logprobs close in bfloat16.

The reference is transformers' own model (eager attention) on the same weights: the real
SmolLM2-135M-Instruct GGUF, loaded by transformers with `gguf_file=`, and tiny random-weight
Llama (llama3 rope scaling), Mistral (sliding window), Qwen2 (qkv bias) and Qwen3 (q/k norm)
models built and saved by tests/hf_models.py. The comparisons are vLLM's (tests/models/utils.py).
"""

import copy
import os

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from hf_models import (
    EOS_TOKEN_ID,
    LLAMA3_ORIGINAL_MAX_POSITIONS,
    SLIDING_WINDOW,
    TINY_MODELS,
    check_logprobs_close,
    check_outputs_equal,
    hf_greedy,
    hf_prompt_logprobs,
    load_hf_model,
    save_tiny_model,
)
from jllm import LLM, SamplingParams
from jllm.models.loader.gguf_loader import load_gguf_tokenizer

# Slow tier: each case builds HF and jllm models and generates with both (minutes in all).
pytestmark = pytest.mark.slow

MAX_TOKENS = 32
NUM_LOGPROBS = 5
# One engine shape for every test: a context long enough for the long prompt, few buckets.
ENGINE_ARGS = dict(max_model_len=1024, max_num_seqs=16)

LONG_PROMPT = (
    "The history of the printing press begins long before Johannes Gutenberg set up his workshop in "
    "Mainz. In China, craftsmen carved whole pages into wooden blocks as early as the seventh century, "
    "and by the eleventh century an artisan named Bi Sheng had experimented with movable characters made "
    "of baked clay. Korean printers later cast metal type, and the Jikji, a collection of Buddhist "
    "teachings printed in 1377, is the oldest surviving book made that way. What Gutenberg added around "
    "1450 was a complete system: a hand mould that produced uniform metal letters quickly, an alloy of "
    "lead, tin and antimony that melted at a low temperature yet held its shape, an oil-based ink that "
    "clung to metal, and a screw press adapted from the presses that wine makers and paper makers already "
    "used. Together these made it possible to print hundreds of identical copies of a page in a day.\n\n"
    "The effects spread quickly. Within fifty years printing shops operated in more than two hundred "
    "European cities, and historians estimate that some twenty million volumes had been produced by the "
    "year 1500. Books became cheaper, and the number of people who could afford to own them grew. "
    "Scholars could compare identical editions instead of copies that differed by every scribe's "
    "mistakes, which helped the spread of new ideas in astronomy, anatomy and mathematics. Pamphlets and "
    "broadsheets carried news and arguments to people who had never owned a book, and the religious "
    "debates of the sixteenth century were fought as much with printed pages as with sermons.\n\n"
    "Printing also changed language itself. Printers preferred consistent spellings, and the dialects "
    "used in the largest printing centres slowly became the standard written forms of English, French "
    "and German. Page numbers, title pages, indexes and tables of contents, which are so familiar today "
    "that we hardly notice them, became common because printed books were identical and so could be "
    "referenced precisely. Governments soon recognised the power of the press and began to license "
    "printers, to censor what they produced and, eventually, to protect authors with the first copyright "
    "laws. In the centuries that followed, steam power, rotary presses and cheap paper made from wood "
    "pulp turned printing into an industry, and newspapers with daily circulations in the hundreds of "
    "thousands appeared in the nineteenth century.\n\n"
    "Even the digital age has not ended the story. Typefaces designed for metal type were redrawn for "
    "photographic typesetting and then for computer screens, and many of the words we still use, such as "
    "font, leading, upper case and lower case, come from the cases of letters that compositors once "
    "arranged by hand. Libraries collect early printed books, called incunabula, as carefully as "
    "manuscripts, because each one records a moment when a new technology was still finding its form.\n\n"
    "Question: In two sentences, what did Gutenberg contribute that earlier printers had not?\nAnswer:"
)
FRENCH_PROMPT = "Quelle est la meilleure façon d'apprendre une nouvelle langue ? Voici quelques conseils :"
CHINESE_PROMPT = "请用简单的语言解释什么是人工智能。"
SMOLLM2_PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea,",
    'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n',
    "Here is a list of three fruits:",
    FRENCH_PROMPT,
    CHINESE_PROMPT,
    "<|im_start|>user\nWhat is the boiling point of water in Celsius?<|im_end|>\n<|im_start|>assistant\n",
    "The three laws of thermodynamics are",
    "Translate to German: Good morning, how are you today?",
    "1, 1, 2, 3, 5, 8, 13,",
    "Écris un court poème sur la mer.",
    LONG_PROMPT,
]
# Longer than the sliding window, then longer than llama3's original_max_position_embeddings.
MEDIUM_PROMPT = (
    "The history of the printing press begins long before Johannes Gutenberg set up his workshop in "
    "Mainz. In China, craftsmen carved whole pages into wooden blocks as early as the seventh century."
)
TINY_PROMPTS = ["Hello, my name is", CHINESE_PROMPT, MEDIUM_PROMPT, LONG_PROMPT]


def greedy(max_tokens=MAX_TOKENS, **kwargs) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, **kwargs)


def jllm_generate(llm: LLM, prompts, params: SamplingParams):
    """One batch through the engine; prompts are texts or token-id lists."""
    inputs = [p if isinstance(p, str) else {"prompt_token_ids": list(p)} for p in prompts]
    return llm.generate(inputs, params, use_tqdm=False)


def as_ids_text(outputs):
    return [(list(o.outputs[0].token_ids), o.outputs[0].text) for o in outputs]


def as_ids_text_logprobs(outputs):
    return [
        (
            list(o.outputs[0].token_ids),
            o.outputs[0].text,
            [{t: lp.logprob for t, lp in step.items()} for step in o.outputs[0].logprobs],
        )
        for o in outputs
    ]


def hf_as_ids_text_logprobs(outputs):
    return [(o.token_ids, o.text, o.logprobs) for o in outputs]


# ---------------------------------------------------------------- SmolLM2-135M-Instruct (GGUF)


@pytest.fixture(scope="module")
def smollm2_llm(smollm2_gguf_path):
    return LLM(model=smollm2_gguf_path, dtype="float32", **ENGINE_ARGS)


@pytest.fixture(scope="module")
def smollm2_hf(smollm2_gguf_path):
    folder, name = os.path.split(smollm2_gguf_path)
    return load_hf_model(folder, torch.float32, gguf_file=name)


@pytest.fixture(scope="module")
def smollm2_greedy(smollm2_llm):
    """jllm's float32 greedy outputs for every prompt, run as one batch."""
    return jllm_generate(smollm2_llm, SMOLLM2_PROMPTS, greedy())


def test_smollm2_prompts_cover_long_and_non_english_text(smollm2_greedy):
    lengths = [len(o.prompt_token_ids) for o in smollm2_greedy]
    assert len(lengths) >= 10
    assert max(lengths) > 500
    assert FRENCH_PROMPT in SMOLLM2_PROMPTS and CHINESE_PROMPT in SMOLLM2_PROMPTS


def test_smollm2_greedy_equals_hf_float32(smollm2_greedy, smollm2_hf, smollm2_llm):
    tokenizer = smollm2_llm.get_tokenizer()
    prompt_ids = [o.prompt_token_ids for o in smollm2_greedy]
    reference = hf_greedy(smollm2_hf, tokenizer, prompt_ids, MAX_TOKENS)
    check_outputs_equal(
        outputs_0_lst=[(o.token_ids, o.text) for o in reference],
        outputs_1_lst=as_ids_text(smollm2_greedy),
        name_0="hf",
        name_1="jllm",
    )


def test_smollm2_prompt_logprobs_match_hf_float32(smollm2_llm, smollm2_hf):
    prompts = [SMOLLM2_PROMPTS[0], FRENCH_PROMPT, CHINESE_PROMPT, SMOLLM2_PROMPTS[6], LONG_PROMPT]
    # Prompts already in the prefix cache must still get logprobs at every position.
    jllm_generate(smollm2_llm, prompts, greedy(max_tokens=1))
    outputs = jllm_generate(smollm2_llm, prompts, greedy(max_tokens=1, prompt_logprobs=NUM_LOGPROBS))
    for output in outputs:
        assert_prompt_logprobs_match(output, hf_prompt_logprobs(smollm2_hf, output.prompt_token_ids))


def assert_prompt_logprobs_match(output, reference: torch.Tensor, atol: float = 1e-3):
    """jllm's prompt logprobs against HF's log_softmax over the prompt, position by position."""
    prompt_ids = output.prompt_token_ids
    prompt_logprobs = output.prompt_logprobs
    assert len(prompt_logprobs) == len(prompt_ids)
    assert prompt_logprobs[0] is None
    for pos in range(1, len(prompt_ids)):
        entries, ref = prompt_logprobs[pos], reference[pos - 1]
        token = prompt_ids[pos]
        where = f"position {pos} of {len(prompt_ids)}"
        assert token in entries, where
        assert len(entries) in (NUM_LOGPROBS, NUM_LOGPROBS + 1), where
        for token_id, lp in entries.items():
            assert abs(lp.logprob - ref[token_id].item()) <= atol, (where, token_id, lp, ref[token_id].item())
        top = sorted((lp.rank, t) for t, lp in entries.items() if lp.rank <= NUM_LOGPROBS)
        assert [rank for rank, _ in top] == list(range(1, NUM_LOGPROBS + 1)), (where, entries)
        # The top-k ids are HF's top-k, up to ties within atol at the k-th place.
        kth = torch.topk(ref, NUM_LOGPROBS).values[-1].item()
        for _, token_id in top:
            assert ref[token_id].item() >= kth - atol, (where, token_id)
        # The prompt token's 1-based rank, up to ties within atol.
        lp = ref[token].item()
        rank = entries[token].rank
        assert int((ref > lp + atol).sum()) + 1 <= rank <= int((ref > lp - atol).sum()) + 1, (where, rank)


@pytest.fixture(scope="module")
def smollm2_llm_bf16(smollm2_gguf_path):
    return LLM(model=smollm2_gguf_path, dtype="bfloat16", **ENGINE_ARGS)


def test_smollm2_logprobs_close_to_hf_bfloat16(smollm2_llm_bf16, smollm2_hf):
    hf_bf16 = copy.deepcopy(smollm2_hf).to(torch.bfloat16)
    outputs = jllm_generate(smollm2_llm_bf16, SMOLLM2_PROMPTS, greedy(logprobs=NUM_LOGPROBS))
    reference = hf_greedy(
        hf_bf16,
        smollm2_llm_bf16.get_tokenizer(),
        [o.prompt_token_ids for o in outputs],
        MAX_TOKENS,
        num_logprobs=NUM_LOGPROBS,
    )
    check_logprobs_close(
        outputs_0_lst=hf_as_ids_text_logprobs(reference),
        outputs_1_lst=as_ids_text_logprobs(outputs),
        name_0="hf",
        name_1="jllm",
    )


# ---------------------------------------------------------------- tiny random-weight models


@pytest.fixture(scope="module")
def tokenizer_folder(tmp_path_factory, smollm2_gguf_path):
    """The SmolLM2 tokenizer saved as HF files, shared by every tiny model."""
    folder = str(tmp_path_factory.mktemp("smollm2-tokenizer"))
    load_gguf_tokenizer(smollm2_gguf_path).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory, tokenizer_folder):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    root = tmp_path_factory.mktemp("tiny-models")
    return {
        name: save_tiny_model(spec, str(root / name), tokenizer, seed=i)
        for i, (name, spec) in enumerate(TINY_MODELS.items())
    }


class TinyModelRun:
    """A tiny model's HF reference and jllm greedy outputs over TINY_PROMPTS."""

    def __init__(self, name: str, folder: str):
        self.name, self.folder = name, folder
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.prompt_ids = [self.tokenizer(p).input_ids for p in TINY_PROMPTS]
        self.hf = load_hf_model(folder)
        self.hf_outputs = hf_greedy(self.hf, self.tokenizer, self.prompt_ids, MAX_TOKENS)
        self.jllm_outputs = jllm_generate(LLM(model=folder, **ENGINE_ARGS), self.prompt_ids, greedy())


@pytest.fixture(scope="module", params=list(TINY_MODELS))
def tiny_run(request, tiny_folders):
    return TinyModelRun(request.param, tiny_folders[request.param])


def test_tiny_prompts_are_longer_than_window_and_original_context(tiny_run):
    lengths = [len(ids) for ids in tiny_run.prompt_ids]
    assert any(SLIDING_WINDOW < n < LLAMA3_ORIGINAL_MAX_POSITIONS for n in lengths), lengths
    assert max(lengths) > 4 * LLAMA3_ORIGINAL_MAX_POSITIONS, lengths


def test_tiny_model_outputs_vary(tiny_run):
    """Random weights at a larger scale than HF's init give varied greedy text, so exact
    agreement is not agreement on one repeated token."""
    outputs = [o.token_ids for o in tiny_run.hf_outputs]
    assert len({tuple(ids) for ids in outputs}) == len(outputs)
    for ids in outputs:
        assert EOS_TOKEN_ID not in ids[:-1]
        assert len(set(ids)) >= len(ids) // 4, ids


def test_tiny_model_greedy_equals_hf_float32(tiny_run):
    check_outputs_equal(
        outputs_0_lst=[(o.token_ids, o.text) for o in tiny_run.hf_outputs],
        outputs_1_lst=as_ids_text(tiny_run.jllm_outputs),
        name_0="hf",
        name_1="jllm",
    )


def _without_feature(name: str, folder: str):
    """The same weights with the architecture's distinguishing feature turned off."""
    config = AutoConfig.from_pretrained(folder)
    if name == "llama3-rope":
        config.rope_parameters = {"rope_type": "default", "rope_theta": config.rope_parameters["rope_theta"]}
    elif name == "mistral-sliding-window":
        config.sliding_window = None
    model = AutoModelForCausalLM.from_pretrained(
        folder, config=config, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if name == "qwen2-qkv-bias" and param_name.endswith("_proj.bias"):
                param.zero_()
            if name == "qwen3-qk-norm" and ("q_norm" in param_name or "k_norm" in param_name):
                param.fill_(1.0)
    return model


def test_tiny_model_feature_changes_hf_output(tiny_run):
    """Each architecture's feature (llama3 scaling, sliding window, qkv bias, q/k norm)
    changes HF's greedy output on the long prompt, so the parity test above covers it."""
    long_prompt = [tiny_run.prompt_ids[-1]]
    ablated = hf_greedy(_without_feature(tiny_run.name, tiny_run.folder), tiny_run.tokenizer, long_prompt, MAX_TOKENS)
    assert ablated[0].token_ids != tiny_run.hf_outputs[-1].token_ids


@pytest.mark.parametrize("name", ["llama3-rope", "qwen3-qk-norm"])
def test_tiny_model_logprobs_close_to_hf_bfloat16(name, tiny_folders):
    folder = tiny_folders[name]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    prompt_ids = [tokenizer(p).input_ids for p in TINY_PROMPTS]
    outputs = jllm_generate(
        LLM(model=folder, dtype="bfloat16", **ENGINE_ARGS), prompt_ids, greedy(logprobs=NUM_LOGPROBS)
    )
    reference = hf_greedy(
        load_hf_model(folder, torch.bfloat16), tokenizer, prompt_ids, MAX_TOKENS, num_logprobs=NUM_LOGPROBS
    )
    check_logprobs_close(
        outputs_0_lst=hf_as_ids_text_logprobs(reference),
        outputs_1_lst=as_ids_text_logprobs(outputs),
        name_0="hf",
        name_1="jllm",
    )


def test_tiny_mistral_prompt_logprobs_match_hf_float32(tiny_folders):
    """Prompt logprobs over a prompt longer than the sliding window."""
    folder = tiny_folders["mistral-sliding-window"]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    prompt_ids = [tokenizer(p).input_ids for p in (MEDIUM_PROMPT, LONG_PROMPT)]
    outputs = jllm_generate(
        LLM(model=folder, **ENGINE_ARGS), prompt_ids, greedy(max_tokens=1, prompt_logprobs=NUM_LOGPROBS)
    )
    hf = load_hf_model(folder)
    for output in outputs:
        assert_prompt_logprobs_match(output, hf_prompt_logprobs(hf, output.prompt_token_ids))
