"""The offline pooling API's behaviour on the tiny Llama run as a last-token embedder:
task resolution and its log lines, vLLM's errors for the wrong task, PoolingParams,
LLM.score's three input shapes, batch invariance, and no recompilation after warm-up."""

import logging

import numpy as np
import pytest

from jllm import LLM, EmbeddingRequestOutput, PoolingParams, SamplingParams
from jllm.outputs import ScoringRequestOutput

ENGINE = dict(dtype="float32", max_model_len=128, max_num_seqs=32, seed=0)


@pytest.fixture(scope="module")
def embedder(tiny_llama_path):
    return LLM(model=tiny_llama_path, runner="pooling", **ENGINE)


def _texts(n: int, rng) -> list[str]:
    words = "the quick brown fox jumps over lazy dogs while seven wizards quietly judge boxing matches".split()
    return [" ".join(rng.choice(words, size=int(rng.integers(1, 40)))) for _ in range(n)]


def test_task_auto_detection_and_vllm_log_lines(tiny_llama_path, caplog):
    with caplog.at_level(logging.INFO, logger="jllm"):
        llm = LLM(model=tiny_llama_path, **ENGINE)
    assert llm.llm_engine.model_config.runner_type == "generate"
    assert llm.supported_tasks == ("generate",)
    assert (
        "This model supports multiple tasks: {'classify', 'embed', 'generate', 'reward', 'score'}. "
        "Defaulting to 'generate'." in caplog.text
    )
    assert "Resolved `--runner auto` to `--runner generate`." in caplog.text
    del llm
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="jllm"):
        llm = LLM(model=tiny_llama_path, task="embed", **ENGINE)
    config = llm.llm_engine.model_config
    assert (config.runner_type, config.convert_type, config.supported_tasks) == (
        "pooling",
        "embed",
        ("embed", "token_embed"),
    )
    assert config.pooler_config.pooling_type == "LAST"


def test_sentence_transformers_folder_pools_by_its_config(tiny_llama_path, tmp_path):
    """A folder with modules.json is an embedding model: its 1_Pooling config and Normalize
    module decide the pooling (here MEAN, not normalized)."""
    import json
    import shutil

    folder = tmp_path / "st"
    shutil.copytree(tiny_llama_path, folder)
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    (folder / "modules.json").write_text(json.dumps(modules))
    llm = LLM(model=str(folder), **ENGINE)
    config = llm.llm_engine.model_config
    assert config.runner_type == "pooling"
    assert (config.pooler_config.pooling_type, config.pooler_config.normalize) == ("MEAN", False)
    token_states = llm.encode(["a b c d"], pooling_task="token_embed", use_tqdm=False)[0].outputs.data
    [embedding] = llm.embed(["a b c d"], use_tqdm=False)
    np.testing.assert_allclose(embedding.outputs.embedding, token_states.mean(axis=0), atol=1e-6)


def test_wrong_task_errors_are_vllms(tiny_llama_path, embedder):
    generator = LLM(model=tiny_llama_path, **ENGINE)
    with pytest.raises(ValueError, match=r"^Embedding API is not supported by this model\. Try converting"):
        generator.embed(["hi"])
    with pytest.raises(ValueError, match=r"^Classification API is not supported by this model\."):
        generator.classify(["hi"])
    with pytest.raises(ValueError, match=r"^LLM\.score\(\) is only supported for pooling models\."):
        generator.score("a", "b")
    with pytest.raises(ValueError, match=r"^LLM\.encode\(\) is only supported for pooling models\."):
        generator.encode(["hi"], pooling_task="embed")
    with pytest.raises(ValueError, match=r"^LLM\.generate\(\) is only supported for generative models\."):
        embedder.generate(["hi"], SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match=r"^Classification API is not supported by this model\."):
        embedder.classify(["hi"])
    with pytest.raises(ValueError, match=r"^pooling_task required for `LLM\.encode`"):
        embedder.encode(["hi"])
    with pytest.raises(ValueError, match=r"^pooling_task must be one of \('embed', 'token_embed'\)"):
        embedder.encode(["hi"], pooling_task="classify")
    with pytest.raises(ValueError, match=r"You cannot overwrite param\.task='classify' with pooling_task='embed'!"):
        embedder.embed(["hi"], pooling_params=PoolingParams(task="classify"))
    with pytest.raises(ValueError, match=r"^`--convert embed` needs `--runner pooling`"):
        LLM(model=tiny_llama_path, runner="generate", convert="embed", **ENGINE)
    with pytest.raises(ValueError, match=r"^runner must be one of \['auto', 'generate', 'pooling'\], got 'embed'"):
        LLM(model=tiny_llama_path, runner="embed", **ENGINE)
    # A rejected call leaves nothing behind.
    assert not embedder.llm_engine.has_unfinished_requests()


def test_pooling_params(embedder):
    with pytest.raises(ValueError, match=r"does not support matryoshka representation"):
        embedder.embed(["hi"], pooling_params=PoolingParams(dimensions=8))
    with pytest.raises(ValueError, match=r"^Task embed only supports \['dimensions', 'normalize'\] parameters, "):
        embedder.embed(["hi"], pooling_params=PoolingParams(use_activation=True))
    with pytest.raises(ValueError, match=r"^truncate_prompt_tokens must be an integer >= 1 or -1"):
        PoolingParams(truncate_prompt_tokens=0)
    assert PoolingParams(activation=False).use_activation is False
    [plain] = embedder.embed(["hello there"], pooling_params=PoolingParams(normalize=False), use_tqdm=False)
    [unit] = embedder.embed(["hello there"], use_tqdm=False)
    plain = np.asarray(plain.outputs.embedding)
    np.testing.assert_allclose(unit.outputs.embedding, plain / np.linalg.norm(plain), atol=1e-6)
    # truncate_prompt_tokens keeps the prompt's last tokens for token-id prompts.
    ids = list(range(100, 140))
    [cut] = embedder.embed([ids], truncate_prompt_tokens=5, use_tqdm=False)
    [tail] = embedder.embed([ids[-5:]], use_tqdm=False)
    assert cut.prompt_token_ids == ids[-5:]
    np.testing.assert_array_equal(cut.outputs.embedding, tail.outputs.embedding)


def test_matryoshka_dimensions(tiny_llama_path):
    llm = LLM(model=tiny_llama_path, runner="pooling", hf_overrides={"matryoshka_dimensions": [16, 32]}, **ENGINE)
    [full] = llm.embed(["hello there"], pooling_params=PoolingParams(normalize=False), use_tqdm=False)
    [short] = llm.embed(["hello there"], pooling_params=PoolingParams(dimensions=16), use_tqdm=False)
    head = np.asarray(full.outputs.embedding[:16])
    np.testing.assert_allclose(short.outputs.embedding, head / np.linalg.norm(head), atol=1e-6)
    with pytest.raises(ValueError, match=r"only supports \[16, 32\] matryoshka dimensions"):
        llm.embed(["hi"], pooling_params=PoolingParams(dimensions=8))


def test_score_shapes_are_cosines_of_the_embeddings(embedder):
    queries = ["what is a fox", "dogs"]
    docs = ["a fox is an animal", "lazy dogs sleep"]
    embeddings = {t: np.asarray(o.outputs.embedding) for t, o in zip(queries + docs, embedder.embed(queries + docs))}

    def cosine(a, b):
        return embeddings[a] @ embeddings[b] / np.linalg.norm(embeddings[a]) / np.linalg.norm(embeddings[b])

    one = embedder.score(queries[0], docs[0], use_tqdm=False)
    one_to_n = embedder.score(queries[0], docs, use_tqdm=False)
    n_to_n = embedder.score(queries, docs, use_tqdm=False)
    assert all(isinstance(o, ScoringRequestOutput) for o in one + one_to_n + n_to_n)
    assert one[0].outputs.score == pytest.approx(cosine(queries[0], docs[0]), abs=1e-6)
    assert [o.outputs.score for o in one_to_n] == pytest.approx([cosine(queries[0], d) for d in docs], abs=1e-6)
    assert [o.outputs.score for o in n_to_n] == pytest.approx([cosine(q, d) for q, d in zip(queries, docs)], abs=1e-6)
    with pytest.raises(ValueError, match=r"^Input lengths must be either 1:1, 1:N or N:N$"):
        embedder.score(queries, docs + ["x"])
    with pytest.raises(ValueError, match=r"^At least one text_pair element must be given$"):
        embedder.score(queries[0], [])


def test_a_text_alone_pools_as_in_a_batch_of_32(embedder):
    rng = np.random.default_rng(0)
    texts = _texts(32, rng)
    batch = embedder.embed(texts, use_tqdm=False)
    assert all(isinstance(o, EmbeddingRequestOutput) and o.finished for o in batch)
    for i in (0, 7, 31):
        [alone] = embedder.embed([texts[i]], use_tqdm=False)
        np.testing.assert_allclose(alone.outputs.embedding, batch[i].outputs.embedding, atol=1e-6)
    # The pages the step used are all back.
    manager = embedder.llm_engine.scheduler.block_manager
    assert manager.usage == 0.0


def test_no_recompilation_after_warm_up(tiny_llama_path):
    llm = LLM(
        model=tiny_llama_path,
        runner="pooling",
        enforce_eager=False,
        max_num_batched_tokens=64,
        compilation_config={"token_buckets": [16, 48]},  # 48: not a power of two
        **{**ENGINE, "max_model_len": 64},
    )
    runner = llm.llm_engine.runner
    compiled = runner.num_compiled_steps
    assert compiled <= len(runner.step_shapes())
    rng = np.random.default_rng(1)
    for size in (1, 3, 9, 20):
        llm.embed(_texts(size, rng), truncate_prompt_tokens=-1, use_tqdm=False)
    # Many short texts beside a long one: the most sequence rows a step of that length has.
    llm.embed(["a"] * 30 + [" ".join(["word"] * 30)], use_tqdm=False)
    # Alone in the 48-token bucket, a 41-token text has length bucket 48, not 64.
    llm.embed([" ".join(["word"] * 40)], use_tqdm=False)
    llm.encode(_texts(3, rng), pooling_task="token_embed", truncate_prompt_tokens=-1, use_tqdm=False)
    assert runner.num_compiled_steps == compiled
