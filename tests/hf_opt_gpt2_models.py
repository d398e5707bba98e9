"""The HF-transformers side of the OPT and GPT-2 parity tests (not a test module).

Tiny random-weight OPTForCausalLM / GPT2LMHeadModel variants, saved as HF folders with a
small byte-level BPE tokenizer trained here on ASCII text, so that every token decodes to
whole characters and the models stay tiny; and the check of jllm's greedy outputs against
transformers' own `generate` (float32, eager attention).
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, OPTConfig, OPTForCausalLM, PreTrainedTokenizerFast

from hf_models import EOS_TOKEN_ID, check_outputs_equal, hf_greedy, load_hf_model

MAX_TOKENS = 20
NUM_LOGPROBS = 5

CORPUS = (
    "The history of the printing press begins long before Johannes Gutenberg set up his workshop in Mainz. "
    "In China, craftsmen carved whole pages into wooden blocks as early as the seventh century, and by the "
    "eleventh century an artisan named Bi Sheng had experimented with movable characters made of baked clay. "
    "Korean printers later cast metal type, and the Jikji, a collection of Buddhist teachings printed in 1377, "
    "is the oldest surviving book made that way. What Gutenberg added around 1450 was a complete system: a hand "
    "mould that produced uniform metal letters quickly, an alloy of lead, tin and antimony that melted at a low "
    "temperature yet held its shape, an oil-based ink that clung to metal, and a screw press adapted from the "
    "presses that wine makers and paper makers already used. Together these made it possible to print hundreds "
    "of identical copies of a page in a day. Within fifty years printing shops operated in more than two hundred "
    "European cities, and some twenty million volumes had been produced by the year 1500. Hello, my name is "
    "Ada. Once upon a time, in a small village by the sea, there lived a fisherman and his daughter."
)
# Different lengths in one batch: 5, ~20, ~60 and ~250 tokens.
PROMPTS = [
    "Hello, my name is",
    "Once upon a time, in a small village by the sea,",
    CORPUS[:300],
    CORPUS,
]


def save_tokenizer(folder: str) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on CORPUS; its alphabet is only CORPUS's characters, so no
    token is a lone byte of a multi-byte character. </s> is EOS_TOKEN_ID (2), as
    hf_greedy expects."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "<pad>", "</s>"], show_progress=False)
    tokenizer.train_from_iterator([CORPUS], trainer)
    hf_tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", pad_token="<pad>", eos_token="</s>"
    )
    assert hf_tokenizer.eos_token_id == EOS_TOKEN_ID
    hf_tokenizer.save_pretrained(folder)
    return hf_tokenizer


def _is_norm(name: str) -> bool:
    return "layer_norm" in name or ".ln_" in name


def randomize_weights(model, seed: int, std: float = 0.15) -> None:
    """Weights and biases ~ N(0, std); LayerNorm scales ~ N(1, 0.2), their biases ~ N(0, 0.1).
    HF's init (std 0.02, zero biases, unit norms) would repeat one token and leave biases
    and norm weights untested."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
            if _is_norm(name) and name.endswith("weight"):
                param.copy_(1.0 + 0.2 * noise)
            elif _is_norm(name):
                param.copy_(0.1 * noise)
            else:
                param.copy_(std * noise)


TINY_OPT = dict(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=512)
TINY_GPT2 = dict(n_embd=64, n_layer=2, n_head=4, n_positions=512)
_TOKENS = dict(bos_token_id=0, pad_token_id=1, eos_token_id=EOS_TOKEN_ID)

VARIANTS = {
    # opt-125m's layout: pre-LN, final LayerNorm, tied head.
    "opt-pre-ln": (OPTConfig, OPTForCausalLM, dict(TINY_OPT)),
    # opt-350m's: post-LN, no final LayerNorm, word embeddings narrower than the model.
    "opt-post-ln-project": (
        OPTConfig,
        OPTForCausalLM,
        dict(TINY_OPT, do_layer_norm_before=False, word_embed_proj_dim=32),
    ),
    # Pre-LN with project_in/out, no biases, no final LayerNorm, gelu, an untied head.
    "opt-pre-ln-project-untied": (
        OPTConfig,
        OPTForCausalLM,
        dict(
            TINY_OPT,
            word_embed_proj_dim=48,
            enable_bias=False,
            _remove_final_layer_norm=True,
            activation_function="gelu",
            tie_word_embeddings=False,
        ),
    ),
    # gpt2's layout: gelu_new (tanh), 4x MLP, tied head.
    "gpt2": (GPT2Config, GPT2LMHeadModel, dict(TINY_GPT2)),
    # Scores divided by layer index + 1, upcast attention, exact gelu, n_inner, untied head.
    "gpt2-inverse-layer-scale-untied": (
        GPT2Config,
        GPT2LMHeadModel,
        dict(
            TINY_GPT2,
            n_inner=96,
            activation_function="gelu",
            scale_attn_by_inverse_layer_idx=True,
            reorder_and_upcast_attn=True,
            tie_word_embeddings=False,
        ),
    ),
}


def save_tiny_model(name: str, folder: str, seed: int) -> str:
    config_cls, model_cls, overrides = VARIANTS[name]
    tokenizer = save_tokenizer(folder)
    config = config_cls(vocab_size=len(tokenizer), **_TOKENS, **overrides)
    torch.manual_seed(seed)
    model = model_cls(config).to(torch.float32)
    randomize_weights(model, seed)
    model.save_pretrained(folder)
    return folder


def save_tiny_models(root: str, names=tuple(VARIANTS)) -> dict[str, str]:
    """Each named variant saved under root/name, seeded by its place in VARIANTS (so a
    variant has the same weights whichever others are saved with it)."""
    seeds = {name: i for i, name in enumerate(VARIANTS)}
    return {name: save_tiny_model(name, f"{root}/{name}", seed=seeds[name]) for name in names}


def prompt_ids(folder: str, prompts=PROMPTS) -> list[list[int]]:
    tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)
    return [tokenizer(p).input_ids for p in prompts]


def assert_equal_to_hf(folder: str, outputs, with_logprobs: bool = False, atol: float = 1e-4) -> None:
    """Greedy ids and text equal to HF's float32 generate; where asked, every step's top-k
    logprobs equal to HF's log_softmax within atol."""
    hf = load_hf_model(folder)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)
    reference = hf_greedy(
        hf, tokenizer, [o.prompt_token_ids for o in outputs], MAX_TOKENS, NUM_LOGPROBS if with_logprobs else None
    )
    check_outputs_equal(
        outputs_0_lst=[(r.token_ids, r.text) for r in reference],
        outputs_1_lst=[(list(o.outputs[0].token_ids), o.outputs[0].text) for o in outputs],
        name_0="hf",
        name_1="jllm",
    )
    if not with_logprobs:
        return
    for r, o in zip(reference, outputs):
        for step, (hf_top, jllm_top) in enumerate(zip(r.logprobs, o.outputs[0].logprobs)):
            assert set(jllm_top) == set(hf_top), (step, jllm_top, hf_top)
            for token_id, lp in jllm_top.items():
                assert abs(lp.logprob - hf_top[token_id]) <= atol, (step, token_id, lp.logprob, hf_top[token_id])
