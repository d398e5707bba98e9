"""`LLM`: vLLM's offline entry point, generating for batches of prompts on jllm's engine."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Sequence

from prometheus_client import CollectorRegistry
from tqdm.auto import tqdm

from jllm.engine.arg_utils import EngineArgs
from jllm.engine.data_parallel import engine_replicas
from jllm.engine.llm_engine import LLMEngine
from jllm.engine.stats import LoggingStatLogger
from jllm.engine.stats_recorder import EngineStatsRecorder
from jllm.entrypoints.openai.metrics import PrometheusStatLogger
from jllm.entrypoints.score_utils import cosine_scores, cross_encoder_prompt, validate_score_input
from jllm.outputs import (
    ClassificationRequestOutput,
    EmbeddingRequestOutput,
    PoolingRequestOutput,
    RequestOutput,
    ScoringRequestOutput,
)
from jllm.pooling_params import PoolingParams
from jllm.sampling_params import RequestOutputKind, SamplingParams
from jllm.transformers_utils.config import get_diff_sampling_param
from jllm.v1.metrics.reader import Metric, get_metrics_snapshot

logger = logging.getLogger(__name__)


class LLM:
    """An offline engine: `LLM(model, **engine_args).generate(prompts, sampling_params)`.

    `model` is an HF folder, a .gguf file or a repo id in the local HF cache; None loads
    the default model (SmolLM2-135M-Instruct). Every EngineArgs field is a keyword.
    """

    def __init__(self, model: str | None = None, **kwargs) -> None:
        self.engine_args = EngineArgs(model=model, **kwargs)
        self.llm_engine = LLMEngine.from_engine_args(self.engine_args)
        self.request_counter = itertools.count()
        # Statistics only when asked for (vLLM's LLM defaults to disable_log_stats=True), into
        # this LLM's own registry: two LLMs in one process never share counts.
        self.metrics_registry: CollectorRegistry | None = None
        if not self.engine_args.disable_log_stats:
            self.metrics_registry = self._gather_stats()

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """SamplingParams() with the model's generation_config.json values, unless
        generation_config="vllm" (vLLM's rule)."""
        return SamplingParams(**get_diff_sampling_param(self.llm_engine.generation_config))

    def get_metrics(self) -> list[Metric]:
        """The engine's metrics as the server's /metrics has them (vllm:* counters, gauges and
        histograms), read from this LLM's registry (`jllm.v1.metrics.reader`)."""
        if self.metrics_registry is None:
            # vLLM's words, and its exception type (its LLMEngine asserts it).
            raise AssertionError("Stat logging disabled: pass disable_log_stats=False to LLM to gather metrics.")
        return get_metrics_snapshot(self.metrics_registry)

    def _gather_stats(self) -> CollectorRegistry:
        """vLLM's stat loggers for an offline engine: the periodic throughput log line and the
        server's Prometheus metrics, fed from every engine step."""
        engine = self.llm_engine
        registry = CollectorRegistry()
        model_config = engine.model_config
        replicas = engine_replicas(engine)
        prometheus = PrometheusStatLogger(
            registry,
            model_config.served_model_name or model_config.model,
            model_config.max_model_len,
            engine.cache_config,
            engine_indexes=[replica.engine_index for replica in replicas],
        )
        stat_loggers = [LoggingStatLogger(), prometheus]
        # Each replica records its own steps, labelled with its engine index (as vLLM's are).
        for replica in replicas:
            replica.stats_recorder = EngineStatsRecorder(replica.scheduler, stat_loggers, replica.engine_index)
        return registry

    # ----- generate ---------------------------------------------------------------

    def generate(
        self,
        prompts,
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool | Callable[..., tqdm] = True,
    ) -> list[RequestOutput]:
        if self.llm_engine.model_config.runner_type != "generate":
            raise ValueError(
                "LLM.generate() is only supported for generative models. Try passing `--runner generate` "
                "to use the model as a generative model."
            )
        prompts = self._as_prompt_list(prompts)
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        if isinstance(sampling_params, Sequence):
            if len(sampling_params) != len(prompts):
                raise ValueError("The lengths of prompts and sampling_params must be the same.")
            params_list = list(sampling_params)
        else:
            params_list = [sampling_params] * len(prompts)
        request_ids = self._add_requests(prompts, params_list)
        return self._run_engine(request_ids, use_tqdm)

    @staticmethod
    def _as_prompt_list(prompts) -> list:
        if isinstance(prompts, (str, dict)):
            return [prompts]
        prompts = list(prompts)
        if prompts and all(isinstance(t, int) for t in prompts):
            return [prompts]  # one prompt of token ids
        return prompts

    def _add_requests(self, prompts: list, params_list: list[SamplingParams | PoolingParams]) -> list[str]:
        added: list[str] = []
        try:
            for prompt, params in zip(prompts, params_list):
                params = params.clone()
                # The offline API returns each request once, whole.
                params.output_kind = RequestOutputKind.FINAL_ONLY
                request_id = str(next(self.request_counter))
                self.llm_engine.add_request(request_id, prompt, params)
                added.append(request_id)
        except Exception:
            # A bad prompt rejects the whole call: nothing of it may stay queued.
            self.llm_engine.abort_request(added)
            raise
        return added

    def _run_engine(self, request_ids: list[str], use_tqdm) -> list[RequestOutput | PoolingRequestOutput]:
        engine = self.llm_engine
        bar = None
        if use_tqdm:
            make_bar = use_tqdm if callable(use_tqdm) else tqdm
            bar = make_bar(
                total=len(request_ids),
                desc="Processed prompts",
                dynamic_ncols=True,
                postfix="est. speed input: 0.00 toks/s, output: 0.00 toks/s",
            )
        finished: dict[str, RequestOutput] = {}
        prompt_tokens = output_tokens = 0
        try:
            while engine.has_unfinished_requests():
                for output in engine.step():
                    if output.error is not None:
                        raise output.error  # the rest are aborted below
                    if not output.finished:
                        continue
                    finished[output.request_id] = output
                    if bar is not None:
                        prompt_tokens += len(output.prompt_token_ids or ())
                        if isinstance(output, RequestOutput):
                            output_tokens += sum(len(o.token_ids) for o in output.outputs)
                        elapsed = bar.format_dict["elapsed"] or 1e-9
                        bar.postfix = (
                            f"est. speed input: {prompt_tokens / elapsed:.2f} toks/s, "
                            f"output: {output_tokens / elapsed:.2f} toks/s"
                        )
                        bar.update(1)
        except BaseException:
            engine.abort_request([r for r in request_ids if r not in finished])
            raise
        finally:
            if bar is not None:
                bar.close()
        return [finished[r] for r in request_ids]

    # ----- pooling ----------------------------------------------------------------

    @property
    def supported_tasks(self) -> tuple[str, ...]:
        return self.llm_engine.model_config.supported_tasks

    def encode(
        self,
        prompts,
        pooling_params: PoolingParams | Sequence[PoolingParams] | None = None,
        *,
        truncate_prompt_tokens: int | None = None,
        use_tqdm: bool | Callable[..., tqdm] = True,
        pooling_task: str | None = None,
    ) -> list[PoolingRequestOutput]:
        """The pooled hidden states of each prompt for `pooling_task` ("embed", "classify",
        "token_embed", "token_classify"), in prompt order."""
        if pooling_task is None:
            raise ValueError(
                "pooling_task required for `LLM.encode`\n"
                "Please use one of the more specific methods or set the pooling_task when using `LLM.encode`:\n"
                '  - For embeddings, use `LLM.embed(...)` or `pooling_task="embed"`.\n'
                '  - For classification logits, use `LLM.classify(...)` or `pooling_task="classify"`.\n'
                "  - For similarity scores, use `LLM.score(...)`.\n"
                '  - For rewards, use `LLM.reward(...)` or `pooling_task="token_classify"`\n'
                '  - For token classification, use `pooling_task="token_classify"`\n'
                '  - For multi-vector retrieval, use `pooling_task="token_embed"`'
            )
        if self.llm_engine.model_config.runner_type != "pooling":
            raise ValueError(
                "LLM.encode() is only supported for pooling models. Try passing `--runner pooling` to use the "
                "model as a pooling model."
            )
        if pooling_task != "score" and pooling_task not in self.supported_tasks:
            raise ValueError(f"pooling_task must be one of {self.supported_tasks}.")
        prompts = self._as_prompt_list(prompts)
        if pooling_params is None:
            pooling_params = PoolingParams()
        if isinstance(pooling_params, Sequence):
            if len(pooling_params) != len(prompts):
                raise ValueError("The lengths of prompts and pooling_params must be the same.")
            params_list = [p.clone() for p in pooling_params]
        else:
            params_list = [pooling_params.clone() for _ in prompts]
        for param in params_list:
            if param.task is None:
                param.task = pooling_task
            elif param.task != pooling_task:
                raise ValueError(f"You cannot overwrite {param.task=!r} with {pooling_task=!r}!")
            if truncate_prompt_tokens is not None:
                param.truncate_prompt_tokens = truncate_prompt_tokens
        return self._run_engine(self._add_requests(prompts, params_list), use_tqdm)

    def embed(
        self,
        prompts,
        *,
        truncate_prompt_tokens: int | None = None,
        use_tqdm: bool | Callable[..., tqdm] = True,
        pooling_params: PoolingParams | Sequence[PoolingParams] | None = None,
    ) -> list[EmbeddingRequestOutput]:
        """One embedding vector per prompt."""
        if "embed" not in self.supported_tasks:
            raise ValueError(
                "Embedding API is not supported by this model. Try converting the model using `--convert embed`."
            )
        items = self.encode(
            prompts,
            pooling_params,
            truncate_prompt_tokens=truncate_prompt_tokens,
            use_tqdm=use_tqdm,
            pooling_task="embed",
        )
        return [EmbeddingRequestOutput.from_base(item) for item in items]

    def classify(
        self,
        prompts,
        *,
        truncate_prompt_tokens: int | None = None,
        use_tqdm: bool | Callable[..., tqdm] = True,
        pooling_params: PoolingParams | Sequence[PoolingParams] | None = None,
    ) -> list[ClassificationRequestOutput]:
        """Class probabilities per prompt."""
        if "classify" not in self.supported_tasks:
            raise ValueError(
                "Classification API is not supported by this model. Try converting the model using "
                "`--convert classify`."
            )
        items = self.encode(
            prompts,
            pooling_params,
            truncate_prompt_tokens=truncate_prompt_tokens,
            use_tqdm=use_tqdm,
            pooling_task="classify",
        )
        return [ClassificationRequestOutput.from_base(item) for item in items]

    def reward(
        self,
        prompts,
        /,
        *,
        truncate_prompt_tokens: int | None = None,
        use_tqdm: bool | Callable[..., tqdm] = True,
        pooling_params: PoolingParams | Sequence[PoolingParams] | None = None,
    ) -> list[PoolingRequestOutput]:
        """Per-token rewards of each prompt (`outputs.data` [tokens, labels])."""
        return self.encode(
            prompts,
            pooling_params,
            truncate_prompt_tokens=truncate_prompt_tokens,
            use_tqdm=use_tqdm,
            pooling_task="token_classify",
        )

    def score(
        self,
        data_1,
        data_2,
        /,
        *,
        truncate_prompt_tokens: int | None = None,
        use_tqdm: bool | Callable[..., tqdm] = True,
        pooling_params: PoolingParams | None = None,
    ) -> list[ScoringRequestOutput]:
        """Similarity scores of the pairs (data_1[i], data_2[i]): 1 to 1, 1 to N (data_1
        repeated) or N to N. A cross-encoder scores each pair in one pass; an embedding
        model gives the cosine similarity of the two embeddings."""
        model_config = self.llm_engine.model_config
        if model_config.runner_type != "pooling":
            raise ValueError(
                "LLM.score() is only supported for pooling models. Try passing `--runner pooling` to use the "
                "model as a pooling model."
            )
        if all(t not in self.supported_tasks for t in ("embed", "classify")):
            raise ValueError(
                "Score API is not supported by this model. Try converting the model using "
                "`--convert embed` or `--convert classify`."
            )
        if model_config.is_cross_encoder and model_config.num_labels != 1:
            raise ValueError("Score API is only enabled for num_labels == 1.")
        data_1, data_2 = validate_score_input(data_1, data_2)
        tokenizer = self.get_tokenizer()
        if not model_config.is_cross_encoder:
            embeds = self.encode(
                data_1 + data_2,
                pooling_params,
                truncate_prompt_tokens=truncate_prompt_tokens,
                use_tqdm=use_tqdm,
                pooling_task="embed",
            )
            pad = getattr(tokenizer, "pad_token_id", None)
            scores = cosine_scores(embeds[: len(data_1)], embeds[len(data_1) :], pad)
            return [ScoringRequestOutput.from_base(item) for item in scores]
        if tokenizer is None:
            raise ValueError("LLM.score() on a cross-encoder needs a tokenizer.")
        truncate = truncate_prompt_tokens
        if truncate == -1:
            truncate = model_config.max_model_len
        prompts = [cross_encoder_prompt(tokenizer, t1, t2, truncate) for t1, t2 in zip(data_1, data_2)]
        items = self.encode(prompts, pooling_params, use_tqdm=use_tqdm, pooling_task="score")
        return [ScoringRequestOutput.from_base(item) for item in items]

    # ----- chat -------------------------------------------------------------------

    def chat(
        self,
        messages,
        sampling_params=None,
        use_tqdm=True,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        chat_template_kwargs: dict | None = None,
    ) -> list[RequestOutput]:
        """Generate replies to one conversation (a list of messages) or a list of them."""
        tokenizer = self.get_tokenizer()
        if tokenizer is None:
            raise ValueError("chat() needs a tokenizer; it cannot be used with skip_tokenizer_init=True.")
        if continue_final_message and add_generation_prompt:
            raise ValueError("continue_final_message and add_generation_prompt cannot both be True.")
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = []
        for conversation in conversations:
            text = tokenizer.apply_chat_template(
                conversation,
                chat_template=chat_template,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
                **(chat_template_kwargs or {}),
            )
            # The template already holds any BOS the model wants.
            ids = tokenizer.encode(text, add_special_tokens=False)
            prompts.append({"prompt": text, "prompt_token_ids": ids})
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)
