"""`LLM`: vLLM's offline entry point, generating for batches of prompts on jllm's engine."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Sequence

from prometheus_client import CollectorRegistry
from tqdm.auto import tqdm

from jllm.engine.arg_utils import EngineArgs
from jllm.engine.llm_engine import LLMEngine
from jllm.engine.stats import LoggingStatLogger
from jllm.engine.stats_recorder import EngineStatsRecorder
from jllm.entrypoints.openai.metrics import PrometheusStatLogger
from jllm.outputs import RequestOutput
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
        prometheus = PrometheusStatLogger(
            registry,
            model_config.served_model_name or model_config.model,
            model_config.max_model_len,
            engine.cache_config,
        )
        engine.stats_recorder = EngineStatsRecorder(engine.scheduler, [LoggingStatLogger(), prometheus])
        return registry

    # ----- generate ---------------------------------------------------------------

    def generate(
        self,
        prompts,
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool | Callable[..., tqdm] = True,
    ) -> list[RequestOutput]:
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

    def _add_requests(self, prompts: list, params_list: list[SamplingParams]) -> list[str]:
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

    def _run_engine(self, request_ids: list[str], use_tqdm) -> list[RequestOutput]:
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
