"""Pre-sharded orbax checkpoints (`jllm convert`, jllm/models/loader/orbax_checkpoint.py):
a converted folder starts an engine on its own, at the tensor_parallel_size it was laid out
for or at another one (orbax reshards), with greedy tokens equal to its source's.

The reference is the source itself, run by the same engine: its greedy tokens are those of
HF transformers, as test_hf_parity.py shows for the SmolLM2 GGUF and for tiny Llama-family
folders saved by transformers (as the tiny Llama here is).
"""

import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jllm import LLM, SamplingParams
from jllm.engine.arg_utils import EngineArgs
from jllm.engine.engine_setup import create_configs, load_model
from jllm.entrypoints.cli import main as jllm_main
from jllm.models.loader import orbax_checkpoint
from jllm.models.loader.orbax_checkpoint import METADATA_FILE, PARAMS_DIR
from tiny_model import ENGINE_ARGS

PROMPTS = [{"prompt_token_ids": [1, 2, 3, 4, 5]}, {"prompt_token_ids": list(range(100, 140))}]
GREEDY = SamplingParams(temperature=0.0, max_tokens=8)


def greedy_tokens(model: str, tensor_parallel_size: int, prompts=PROMPTS, **kwargs) -> list[list[int]]:
    llm = LLM(model=model, tensor_parallel_size=tensor_parallel_size, dtype="float32", **ENGINE_ARGS, **kwargs)
    return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, GREEDY, use_tqdm=False)]


@pytest.fixture(scope="module")
def converted(tmp_path_factory, tiny_llama_path) -> str:
    """The tiny Llama converted through the command line, laid out for 2 devices."""
    out = str(tmp_path_factory.mktemp("converted") / "tiny_llama_tp2")
    jllm_main(["convert", tiny_llama_path, out, "--tensor-parallel-size", "2"])
    return out


@pytest.fixture(scope="module")
def source_tokens(tiny_llama_path) -> list[list[int]]:
    return greedy_tokens(tiny_llama_path, 1, skip_tokenizer_init=True)


def test_converted_folder_holds_what_an_engine_starts_from(converted, tiny_llama_path):
    names = set(os.listdir(converted))
    assert {"config.json", "tokenizer.json", "generation_config.json", METADATA_FILE, PARAMS_DIR} <= names
    assert not [n for n in names if n.endswith(".safetensors")]
    metadata = json.load(open(os.path.join(converted, METADATA_FILE)))
    assert metadata["format_version"] == 1 and metadata["tensor_parallel_size"] == 2
    assert metadata["dtype"] == "float32" and metadata["architecture"] == "LlamaForCausalLM"
    assert metadata["source"] == tiny_llama_path
    assert json.load(open(os.path.join(converted, "config.json")))["dtype"] == "float32"
    for name in ("tokenizer.json", "generation_config.json"):  # Copied as they are.
        with open(os.path.join(converted, name), "rb") as copy, open(os.path.join(tiny_llama_path, name), "rb") as f:
            assert copy.read() == f.read()


@pytest.mark.parametrize("tensor_parallel_size", [2, 1], ids=["as_laid_out", "resharded"])
def test_restored_greedy_tokens_equal_the_source_folders(converted, source_tokens, tensor_parallel_size):
    assert greedy_tokens(converted, tensor_parallel_size, skip_tokenizer_init=True) == source_tokens


def _params(model: str, tensor_parallel_size: int) -> dict:
    args = EngineArgs(model=model, tensor_parallel_size=tensor_parallel_size, dtype="float32", **ENGINE_ARGS)
    return load_model(args, create_configs(args))[1]["params"]


def test_each_device_restores_only_its_shard_of_the_source_weights(converted, tiny_llama_path):
    """q_proj (64 x 4 heads x 16) is stored in chunks of 2 heads, one per device it was laid
    out for, and restores as 2 heads on each device, equal to the safetensors' weights."""
    stored = ocp.PyTreeCheckpointer().metadata(os.path.join(converted, PARAMS_DIR)).item_metadata.tree
    assert stored["params"]["layers_0"]["self_attn"]["q_proj"].storage.chunk_shape == (64, 2, 16)
    restored, source = _params(converted, 2), _params(tiny_llama_path, 1)
    q_proj = restored["layers_0"]["self_attn"]["q_proj"]
    assert [s.data.shape for s in q_proj.addressable_shards] == [(64, 2, 16), (64, 2, 16)]
    assert len({s.device for s in q_proj.addressable_shards}) == 2
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), restored, source)


def test_a_converted_folder_converts_again_for_another_size(converted, tmp_path):
    out = str(tmp_path / "tiny_llama_tp1")
    jllm_main(["convert", converted, out])
    assert json.load(open(os.path.join(out, METADATA_FILE)))["tensor_parallel_size"] == 1
    stored = ocp.PyTreeCheckpointer().metadata(os.path.join(out, PARAMS_DIR)).item_metadata.tree
    assert stored["params"]["layers_0"]["self_attn"]["q_proj"].storage.chunk_shape == (64, 4, 16)
    jax.tree.map(
        lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), _params(out, 1), _params(converted, 1)
    )


@pytest.mark.slow
def test_gguf_converts_to_a_folder_with_its_greedy_tokens(smollm2_gguf_path, tmp_path):
    """SmolLM2's GGUF (9 query and 3 kv heads) laid out for 3 devices, restored on one:
    config, tokenizer and generation config come from what the GGUF loader derives, so text
    prompts tokenize and generate as from the GGUF itself."""
    out = str(tmp_path / "smollm2_tp3")
    jllm_main(["convert", smollm2_gguf_path, out, "-tp", "3"])
    metadata = json.load(open(os.path.join(out, METADATA_FILE)))
    assert metadata["tensor_parallel_size"] == 3 and metadata["architecture"] == "LlamaForCausalLM"
    prompts = ["The capital of France is", "Hello, my name is"]
    assert greedy_tokens(out, 1, prompts) == greedy_tokens(smollm2_gguf_path, 1, prompts)


def test_convert_refuses_an_output_folder_that_is_not_empty(tiny_llama_path, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit):
        jllm_main(["convert", tiny_llama_path, str(tmp_path)])
    assert "already exists and is not empty" in capsys.readouterr().err
    assert os.listdir(tmp_path) == ["notes.txt"]


def test_convert_of_an_unknown_model_says_it_was_not_found(tmp_path, capsys):
    with pytest.raises(SystemExit):
        jllm_main(["convert", str(tmp_path / "no_such_model"), str(tmp_path / "out")])
    assert "was not found locally" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_failed_conversion_leaves_nothing_behind(tiny_llama_path, tmp_path, monkeypatch):
    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(orbax_checkpoint, "_write_model_files", fail)
    with pytest.raises(OSError, match="disk full"):
        jllm_main(["convert", tiny_llama_path, str(tmp_path / "out")])
    assert os.listdir(tmp_path) == []


def test_orbax_load_format_needs_a_converted_folder(tiny_llama_path):
    with pytest.raises(ValueError, match="not a pre-sharded jllm checkpoint"):
        LLM(model=tiny_llama_path, load_format="orbax", skip_tokenizer_init=True, **ENGINE_ARGS)


def test_restoring_into_another_model_names_the_parameters_that_differ(converted):
    """Run as an embedding model, the Llama has no LM head: the checkpoint's lm_head is named."""
    # A pooling step takes whole prompts, so its token budget covers max_model_len.
    engine_args = {**ENGINE_ARGS, "max_num_batched_tokens": ENGINE_ARGS["max_model_len"]}
    with pytest.raises(ValueError, match=r"\['params'\]\['lm_head'\]: checkpoint \(64, 49152\), model None"):
        LLM(model=converted, runner="pooling", convert="embed", skip_tokenizer_init=True, **engine_args)
