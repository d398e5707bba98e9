"""A tiny random-weight Llama saved as an HF folder, and the engine settings the
engine-behaviour tests share.

The weights are drawn wider than HF's default init (std 0.15) so that greedy outputs
vary from token to token instead of collapsing onto one token; the tokenizer is
SmolLM2's (vocabulary 49152), so prompts are real text and outputs decode.
"""

from __future__ import annotations

import os

VOCAB_SIZE = 49152
WEIGHT_STD = 0.15
EOS_TOKEN_ID = 2  # SmolLM2's <|im_end|>

# One engine shape family for every engine-behaviour module. A compiled step depends
# on the token bucket, the sequence bucket min(tokens, max_num_seqs), the page bucket,
# the KV pool's size and the rope table's length (max_model_len), so engines that agree
# on all of these share programs through JAX's persistent compilation cache: on two
# CPU cores each program costs seconds to compile, and only the first engine pays.
MAX_MODEL_LEN = 320  # page buckets 4, 8, 16, 20
NUM_BLOCKS = 512  # 8192 tokens: more than every batch here needs, so no preemption
ENGINE_ARGS = dict(
    max_model_len=MAX_MODEL_LEN,
    num_gpu_blocks_override=NUM_BLOCKS,
    # Token buckets 16 and 64, and 16 sequence rows in both (min(tokens, max_num_seqs)),
    # as in an engine with 16-token chunks and max_num_seqs=16. Few rows also keep
    # random sampling cheap: on the CPU its noise costs milliseconds per row.
    max_num_batched_tokens=64,
    max_num_seqs=16,
    compilation_config={"token_buckets": [16]},
    seed=0,
)


def build_tiny_llama(folder: str, tokenizer_gguf_path: str, *, seed: int = 0) -> str:
    """Save a 2-layer LlamaForCausalLM (hidden 64, 4 heads, 2 KV heads, untied
    embeddings) with SmolLM2's tokenizer into `folder`; returns the folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from jllm.models.loader.gguf_loader import load_gguf_tokenizer

    tokenizer = load_gguf_tokenizer(tokenizer_gguf_path)
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    assert tokenizer.eos_token_id == EOS_TOKEN_ID
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" not in name:  # RMSNorm scales stay at one
                param.normal_(0.0, WEIGHT_STD)
    os.makedirs(folder, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder
