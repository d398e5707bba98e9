"""Logs each request's prompt and sampling parameters, the prompt cut to --max-log-len
(vLLM's RequestLogger)."""

from __future__ import annotations

import logging

from jllm.sampling_params import SamplingParams

logger = logging.getLogger("jllm.entrypoints.openai.requests")


class RequestLogger:
    def __init__(self, max_log_len: int | None) -> None:
        self.max_log_len = max_log_len

    def log_inputs(
        self,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: list[int] | None,
        params: SamplingParams | None,
        user: str | None = None,
    ) -> None:
        """`user` is OpenAI's end-user id: it changes nothing in generation and is here
        so that an operator can trace abuse to it, which is what it is for."""
        if self.max_log_len is not None:
            if prompt is not None:
                prompt = prompt[: self.max_log_len]
            if prompt_token_ids is not None:
                prompt_token_ids = prompt_token_ids[: self.max_log_len]
        logger.info(
            "Received request %s: prompt: %r, params: %s, prompt_token_ids: %s%s",
            request_id,
            prompt,
            params,
            prompt_token_ids,
            f", user: {user!r}" if user is not None else "",
        )
