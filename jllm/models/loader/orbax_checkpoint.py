"""Pre-sharded checkpoints (`jllm convert`): a model's parameters saved with
orbax-checkpoint in the shards of a tensor-parallel mesh, beside the HF config, tokenizer
and generation config the engine starts from, and restored shard by shard onto each device.

The folder is an HF model folder whose weights are an orbax checkpoint:

    config.json, tokenizer*.json, generation_config.json, ...  (as the source had them)
    jllm_checkpoint.json   this format's metadata; its presence marks the folder
    params/                the orbax checkpoint of the parameter tree

Each array is stored in chunks of the shard one device held when it was saved, so a device
restoring at that tensor_parallel_size reads exactly its own chunks; at another size orbax
reads the chunks that overlap each device's slice (it reshards).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import tempfile

import jax

logger = logging.getLogger("jllm")

METADATA_FILE = "jllm_checkpoint.json"
PARAMS_DIR = "params"
FORMAT = "jllm-orbax"
FORMAT_VERSION = 1

# What an HF folder holds besides the files the engine starts from: its weights, in any
# framework's format, which the orbax checkpoint replaces. (Also this format's own parts, so
# that a converted folder converts again, at another tensor_parallel_size.)
_WEIGHT_FILES = (
    "*.safetensors",
    "*.safetensors.index.json",
    "*.bin",
    "*.bin.index.json",
    "*.pt",
    "*.pth",
    "*.ckpt",
    "*.h5",
    "*.msgpack",
    "*.onnx",
    "*.onnx_data",
    "*.ot",
    "*.tflite",
    "*.gguf",
    ".git",
    METADATA_FILE,
    PARAMS_DIR,
)


def is_orbax_checkpoint(path: str) -> bool:
    return os.path.isfile(os.path.join(path, METADATA_FILE))


def read_checkpoint_metadata(path: str) -> dict:
    """The folder's jllm_checkpoint.json, checked to be a format this jllm reads."""
    if not is_orbax_checkpoint(path):
        raise ValueError(
            f"{path!r} is not a pre-sharded jllm checkpoint (it has no {METADATA_FILE}); "
            f"write one with `jllm convert MODEL {path}`."
        )
    with open(os.path.join(path, METADATA_FILE)) as f:
        metadata = json.load(f)
    if metadata.get("format") != FORMAT or metadata.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(
            f"{path!r} holds a checkpoint of format {metadata.get('format')!r} version "
            f"{metadata.get('format_version')}; this jllm reads {FORMAT!r} up to version {FORMAT_VERSION}."
        )
    return metadata


def check_output_folder(out: str, source: str) -> None:
    """Refuses a folder that already holds anything (a conversion never mixes its files with
    others, nor overwrites a model) or that lies inside the source folder it copies."""
    out, source = os.path.abspath(out), os.path.abspath(source)
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise ValueError(f"The output folder {out!r} already exists and is not empty; name a new or empty folder.")
    if os.path.isdir(source) and os.path.commonpath([out, source]) == source:
        raise ValueError(f"The output folder {out!r} is inside the model folder {source!r}; name one outside it.")


def save_checkpoint(out: str, params: dict, source: str, hf_config, metadata: dict) -> None:
    """Writes `params` (as laid out over their mesh) into `out` with everything the engine
    starts from: `source`'s config, tokenizer and generation config, and `metadata`.

    The folder is written beside `out` and renamed into place once complete, so a failed or
    interrupted conversion never leaves a folder that looks like a checkpoint.
    """
    import orbax.checkpoint as ocp

    out = os.path.abspath(out)
    check_output_folder(out, source)
    parent, name = os.path.split(out)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(dir=parent, prefix=f".{name}.converting-")
    try:
        # mkdtemp's folder is private to its owner; a model folder is read as any other.
        os.chmod(staging, 0o755)
        _write_model_files(source, hf_config, metadata["dtype"], staging)
        with _checkpointer() as checkpointer:
            checkpointer.save(os.path.join(staging, PARAMS_DIR), args=ocp.args.PyTreeSave(params))
        with open(os.path.join(staging, METADATA_FILE), "w") as f:
            json.dump({"format": FORMAT, "format_version": FORMAT_VERSION, **metadata}, f, indent=1)
        # rename(2) replaces an empty folder and refuses a non-empty one.
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _write_model_files(source: str, hf_config, dtype: str, folder: str) -> None:
    """The source's files the engine reads besides weights. config.json is the config as
    the engine resolved it (hf_overrides applied), stating the dtype the weights are saved
    in, so that dtype="auto" restores them as they are."""
    from jllm.models.loader.gguf_loader import gguf_generation_config, is_gguf_file, load_gguf_tokenizer

    if is_gguf_file(source):
        load_gguf_tokenizer(source).save_pretrained(folder)
        generation_config = gguf_generation_config(source)
        if generation_config:
            with open(os.path.join(folder, "generation_config.json"), "w") as f:
                json.dump(generation_config, f, indent=1)
    else:
        shutil.copytree(source, folder, ignore=shutil.ignore_patterns(*_WEIGHT_FILES), dirs_exist_ok=True)
    config = copy.deepcopy(hf_config)
    config.dtype = dtype
    config.save_pretrained(folder)


def restore_params(path: str, shapes: dict, shardings: dict) -> dict:
    """The parameter tree restored from the checkpoint in `path`, each leaf straight into
    its target sharding and dtype (orbax's restore args): every device reads only the
    chunks of its own slice."""
    import orbax.checkpoint as ocp

    metadata = read_checkpoint_metadata(path)
    target = jax.tree.map(
        lambda shape, sharding: jax.ShapeDtypeStruct(shape.shape, shape.dtype, sharding=sharding), shapes, shardings
    )
    devices = len(jax.tree.leaves(shardings)[0].device_set)
    logger.info(
        "Restoring the orbax checkpoint %s (laid out for tensor_parallel_size=%d) onto %d device(s).",
        path,
        metadata["tensor_parallel_size"],
        devices,
    )
    directory = os.path.join(os.path.abspath(path), PARAMS_DIR)
    with _checkpointer() as checkpointer:
        _check_same_parameters(path, checkpointer.metadata(directory).item_metadata.tree, target)
        restore_args = ocp.checkpoint_utils.construct_restore_args(target)
        return checkpointer.restore(directory, args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args))


def _checkpointer():
    # orbax is imported where it is used, here and above: importing it adds about 0.7 s to
    # every engine's start, most of which never read this format.
    import orbax.checkpoint as ocp

    # Uncompressed: the format exists to start engines quickly, and decompressing zstd chunks
    # cost more than the bytes it saves (SmolLM2 in bfloat16: 257 MB plain against 201 MB
    # compressed, restored on two CPU cores in 0.66 s against 0.87 s).
    return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_compression=False))


def _check_same_parameters(path: str, stored: dict, target: dict) -> None:
    """The model's parameters are the checkpoint's, by name and shape (else the engine was
    configured otherwise than the conversion: another runner, head or hf_overrides)."""

    def named(tree) -> dict:
        return {jax.tree_util.keystr(p): tuple(leaf.shape) for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}

    have, want = named(stored), named(target)
    differ = sorted(k for k in have.keys() | want.keys() if have.get(k) != want.get(k))
    if differ:
        details = ", ".join(f"{k}: checkpoint {have.get(k)}, model {want.get(k)}" for k in differ[:5])
        raise ValueError(
            f"The checkpoint in {path!r} does not hold the parameters this engine's model needs ({details}). "
            "Start the engine with the settings it was converted with, or convert the source again."
        )
