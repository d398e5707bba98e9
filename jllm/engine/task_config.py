"""What the engine runs a model as: vLLM's runner ("generate" or "pooling"), convert
("none", "embed", "classify", "reward") and the older `task`, resolved against the
architecture, plus the pooler a pooling model uses.

The architecture decides under "auto" (vLLM's rule): a `*ForCausalLM` / `*LMHeadModel`
generates, unless its folder is a sentence-transformers model; a base model (`BertModel`,
`Qwen3Model`) embeds; `*ForSequenceClassification` classifies (and scores pairs when it has
one label); `*ForRewardModel` gives rewards. A generative architecture asked to pool is
converted as vLLM converts it: last-token pooling, and for "classify" a head read from
the checkpoint's `score` weights.
"""

from __future__ import annotations

import dataclasses
import logging

from jllm.config import CONVERT_TYPES, RUNNER_TYPES, TASKS, PoolerConfig
from jllm.models.interface import ModelFamily, ModelHead
from jllm.transformers_utils.sentence_transformers import get_pooling_config, is_sentence_transformers_folder

logger = logging.getLogger("jllm")

# vLLM's mapping of the older task= onto (runner, convert).
_TASK_TO_RUNNER_CONVERT = {
    "generate": ("generate", "none"),
    "embed": ("pooling", "embed"),
    "classify": ("pooling", "classify"),
    "score": ("pooling", "classify"),
    "reward": ("pooling", "reward"),
}
_HEAD_CONVERT = {ModelHead.EMBED: "embed", ModelHead.CLASSIFY: "classify", ModelHead.REWARD: "reward"}
_CONVERT_HEAD = {"embed": ModelHead.EMBED, "classify": ModelHead.CLASSIFY, "reward": ModelHead.EMBED}


@dataclasses.dataclass(frozen=True)
class ModelTask:
    runner_type: str
    convert_type: str
    # The head the model is built with (a converted generator drops its LM head).
    head: ModelHead
    supported_tasks: tuple[str, ...]
    pooler_config: PoolerConfig | None
    is_cross_encoder: bool
    num_labels: int

    @property
    def pooling(self) -> bool:
        return self.runner_type == "pooling"


def resolve_model_task(
    *,
    architecture: str,
    family: ModelFamily,
    native_head: ModelHead,
    hf_config,
    model_path: str,
    runner: str,
    convert: str,
    task: str,
    pooler_config: PoolerConfig | None,
) -> ModelTask:
    _check_choice("runner", runner, RUNNER_TYPES)
    _check_choice("convert", convert, CONVERT_TYPES)
    _check_choice("task", task, TASKS)
    generative = native_head == ModelHead.LM
    legacy = _legacy_tasks(native_head, hf_config)
    if task != "auto":
        if task not in legacy:
            raise ValueError(f"This model does not support the '{task}' task. Supported tasks: {_set_repr(legacy)}")
        task_runner, task_convert = _TASK_TO_RUNNER_CONVERT[task]
        runner = task_runner if runner == "auto" else runner
        if convert == "auto" and generative:
            convert = task_convert
    elif len(legacy) > 1:
        default = "generate" if generative and runner != "pooling" else _HEAD_CONVERT.get(native_head, "embed")
        logger.info("This model supports multiple tasks: %s. Defaulting to '%s'.", _set_repr(legacy), default)

    if runner == "auto":
        pools = not generative or convert not in ("auto", "none") or is_sentence_transformers_folder(model_path)
        runner = "pooling" if pools else "generate"
        logger.info(
            "Resolved `--runner auto` to `--runner %s`. Pass the value explicitly to silence this message.", runner
        )
    if runner == "generate":
        if not generative:
            raise ValueError(f"This model does not support `--runner generate`: {architecture} is a pooling model.")
        if convert not in ("auto", "none"):
            raise ValueError(f"`--convert {convert}` needs `--runner pooling`.")
        return ModelTask("generate", "none", ModelHead.LM, ("generate",), None, False, 0)

    if generative:
        if convert in ("auto", "none"):
            resolved = "embed"
            if convert == "auto":
                logger.info(
                    "Resolved `--convert auto` to `--convert embed`. Pass the value explicitly to silence this message."
                )
            convert = resolved
        head = _CONVERT_HEAD[convert]
    else:
        if convert not in ("auto", "none", _HEAD_CONVERT[native_head]):
            raise ValueError(
                f"`--convert {convert}` applies to generative models; {architecture} is already a "
                f"{_HEAD_CONVERT[native_head]} model."
            )
        convert, head = "none", native_head

    num_labels = int(getattr(hf_config, "num_labels", 0) or 0) if head in (ModelHead.CLASSIFY, ModelHead.REWARD) else 0
    reward = head == ModelHead.REWARD or convert == "reward"
    if reward:
        supported = ("token_classify",)
    elif head == ModelHead.CLASSIFY:
        supported = ("classify", "token_classify")
    else:
        supported = ("embed", "token_embed")
    pooling = _pooler_config(family, model_path, reward, pooler_config)
    return ModelTask(
        "pooling",
        convert,
        head,
        supported,
        pooling,
        is_cross_encoder=head == ModelHead.CLASSIFY,
        num_labels=num_labels,
    )


def _pooler_config(family: ModelFamily, model_path: str, reward: bool, user: PoolerConfig | None) -> PoolerConfig:
    """vLLM's order: the architecture's default, then the sentence-transformers folder's
    own pooling, then what the user passed."""
    values = {"pooling_type": family.default_pooling_type}
    if reward:
        # A reward model's outputs are its raw per-token rewards, as its HF code returns them.
        values.update(pooling_type="ALL", use_activation=False)
    values.update(get_pooling_config(model_path) or {})
    if user is not None:
        values.update({k: v for k, v in dataclasses.asdict(user).items() if v is not None})
    return PoolerConfig(**values)


def _legacy_tasks(native_head: ModelHead, hf_config) -> set[str]:
    """The older task= values the architecture can serve (what vLLM's log line lists)."""
    if native_head == ModelHead.LM:
        return {"generate", "embed", "classify", "score", "reward"}
    if native_head == ModelHead.CLASSIFY:
        one_label = int(getattr(hf_config, "num_labels", 0) or 0) == 1
        return {"classify", "score"} if one_label else {"classify"}
    if native_head == ModelHead.REWARD:
        return {"reward"}
    return {"embed", "score"}


def _set_repr(tasks: set[str]) -> str:
    return "{" + ", ".join(repr(t) for t in sorted(tasks)) + "}"


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}.")
