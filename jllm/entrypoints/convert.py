"""`jllm convert [MODEL] OUT -tp N`: a model saved as a pre-sharded orbax checkpoint, its
weights laid out in the shards of N devices, which `LLM(model=OUT)` restores shard by shard
(jllm/models/loader/orbax_checkpoint.py has the format).

The model is built as an engine builds it (the same configs, mesh and loaders), so the
checkpoint holds exactly the parameters an engine of these settings runs.
"""

from __future__ import annotations

import argparse
import logging

from jllm import __version__
from jllm.engine.arg_utils import EngineArgs

logger = logging.getLogger("jllm")


def convert(
    model: str | None, out: str, tensor_parallel_size: int = 1, dtype: str = "auto", revision: str | None = None
) -> str:
    """Converts `model` (anything `LLM(model=...)` takes; None: the default model) into the
    new or empty folder `out`; returns `out`."""
    from jllm.engine.engine_setup import create_configs, load_model
    from jllm.models.loader.orbax_checkpoint import check_output_folder, save_checkpoint

    args = EngineArgs(model=model, tensor_parallel_size=tensor_parallel_size, dtype=dtype, revision=revision)
    configs = create_configs(args)
    source = configs.model_config.model
    # Before the weights load: that is the conversion's long part.
    check_output_folder(out, source)
    _, params, _ = load_model(args, configs)
    metadata = {
        "dtype": configs.model_config.dtype,
        "tensor_parallel_size": tensor_parallel_size,
        "architecture": configs.model_config.architecture,
        "source": source,
        "revision": revision,
        "jllm_version": __version__,
    }
    save_checkpoint(out, params, source, configs.hf_config, metadata)
    logger.info("Saved %s as an orbax checkpoint for tensor_parallel_size=%d in %s.", source, tensor_parallel_size, out)
    return out


def make_arg_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument(
        "model",
        nargs="?",
        default=None,
        help="The model: an HF folder, a .gguf file, a repo id in the local HF cache, or a converted folder; "
        "the default model when left out.",
    )
    parser.add_argument("output_dir", help="The new (or empty) folder the checkpoint is written to.")
    parser.add_argument(
        "-tp",
        "--tensor-parallel-size",
        type=int,
        default=1,
        help="Devices the weights are laid out for; an engine restores them at any tensor_parallel_size, "
        "reading only its own shards at this one. Needs that many devices to convert.",
    )
    parser.add_argument(
        "--dtype",
        default="auto",
        help="The dtype the weights are saved in ('auto': the engine's choice for the model, as in serving).",
    )
    parser.add_argument("--revision", default=None, help="Model revision (a ref or commit in the local HF cache).")
    return parser
