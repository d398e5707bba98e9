"""Engine start-up from a safetensors folder against its pre-sharded orbax conversion
(`jllm convert`), at a real model's shape with random weights.

    python scripts/benchmark_startup.py --shape llama-3.1-8b --tensor-parallel-size 2 \
        [--repeats 3] [--workdir DIR] [--drop-caches] [engine flags]

Writes the shape as an HF folder of random bfloat16 weights (vLLM's dummy range, in
safetensors files of at most 4 GiB), converts it with `jllm convert` at the same
tensor_parallel_size, then starts an engine from each folder `--repeats` times, each start
in a fresh process and the order alternating, so that neither variant finds the other's
process state warm. The compilation cache is warmed by one untimed start first (unless
--enforce-eager), so both variants compile nothing; both folders were just written, so both
are read from the page cache unless --drop-caches (root) empties it before every start.

Per start it records the time to a ready `LLM` and the weight loading alone (load_model,
until the parameters are on the devices), and writes a JSON record under scripts/results/.
`--tiny` runs a 2-layer shape, for a smoke test on the CPU.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from scripts.model_shapes import SHAPES  # noqa: E402

# A 2-layer Llama for --tiny (the CPU smoke test): 4 heads, so it splits at TP 1, 2 and 4.
TINY_SHAPE = {
    **SHAPES["llama-3.2-1b"],
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 512,
    "max_position_embeddings": 1024,
    "rope_scaling": None,
    "tie_word_embeddings": False,
}
SHARD_BYTES = 4 << 30


def write_random_safetensors(folder: str, config: dict, seed: int = 0) -> int:
    """An HF folder of `config` with random bfloat16 weights: uniform in [-1e-3, 1e-3], norm
    scales at 1 (vLLM's dummy weights), the tensor names and shapes transformers gives the
    architecture. Returns the bytes written."""
    import ml_dtypes
    import numpy as np
    import torch
    from safetensors.numpy import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    hf_config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        shapes = {name: tuple(t.shape) for name, t in AutoModelForCausalLM.from_config(hf_config).state_dict().items()}
    if hf_config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)  # Saved once, as transformers saves it.
    rng = np.random.default_rng(seed)
    shards, shard, shard_bytes, total = [], {}, 0, 0

    def flush():
        name = f"model-{len(shards) + 1:05d}.safetensors"
        save_file(shard, os.path.join(folder, name))
        shards.append((name, list(shard)))

    for name, shape in shapes.items():
        if "norm" in name:
            w = np.ones(shape, ml_dtypes.bfloat16)
        else:
            w = rng.uniform(-1e-3, 1e-3, shape).astype(np.float32).astype(ml_dtypes.bfloat16)
        if shard and shard_bytes + w.nbytes > SHARD_BYTES:
            flush()
            shard, shard_bytes = {}, 0
        shard[name] = w
        shard_bytes += w.nbytes
        total += w.nbytes
    flush()
    weight_map = {tensor: name for name, tensors in shards for tensor in tensors}
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    return total


def time_one_start(model: str, engine_flags: list[str]) -> dict:
    """In this (fresh) process: an engine started from `model`, timed whole and in its
    weight loading."""
    import jax

    from jllm import LLM, EngineArgs
    from jllm.engine import engine_setup

    parser = argparse.ArgumentParser()
    EngineArgs.add_cli_args(parser)
    engine_args = EngineArgs.from_cli_args(parser.parse_args(engine_flags))
    engine_args.model = model
    engine_args.skip_tokenizer_init = True
    load_model, timings = engine_setup.load_model, {}

    def timed_load_model(*args):
        start = time.perf_counter()
        model_params_constants = load_model(*args)
        jax.block_until_ready(model_params_constants[1])
        timings["load_weights_s"] = time.perf_counter() - start
        return model_params_constants

    engine_setup.load_model = timed_load_model
    start = time.perf_counter()
    LLM(**vars(engine_args))
    timings["ready_s"] = time.perf_counter() - start
    timings["device"], timings["jax_version"] = jax.devices()[0].device_kind, jax.__version__
    return timings


def run(command: list[str]) -> str:
    # From the repository root, so `-m jllm...` finds the package where it is not installed.
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-4000:]}")
    return result.stdout


def start_in_fresh_process(model: str, engine_flags: list[str], drop_caches: bool) -> dict:
    if drop_caches:
        subprocess.run(["sync"], check=True)
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3")
    out = run([sys.executable, os.path.abspath(__file__), "--time-one-start", model, *engine_flags])
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.2-1b")
    parser.add_argument("--tiny", action="store_true", help="A 2-layer shape (the CPU smoke test).")
    parser.add_argument("-tp", "--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="Starts of each variant.")
    parser.add_argument("--workdir", default=None, help="Where the folders are written (default: a temporary one).")
    parser.add_argument("--drop-caches", action="store_true", help="Empty the page cache before each start (root).")
    parser.add_argument("--results-dir", default=os.path.join(os.path.dirname(__file__), "results"))
    parser.add_argument("--time-one-start", metavar="MODEL", help=argparse.SUPPRESS)
    args, engine_flags = parser.parse_known_args(argv)
    if args.time_one_start:
        print(json.dumps(time_one_start(args.time_one_start, engine_flags)))
        return {}

    shape_name = "tiny" if args.tiny else args.shape
    workdir = args.workdir or tempfile.mkdtemp(prefix="jllm_startup_")
    safetensors_folder = os.path.join(workdir, f"{shape_name}_safetensors")
    orbax_folder = os.path.join(workdir, f"{shape_name}_orbax_tp{args.tensor_parallel_size}")
    start = time.perf_counter()
    checkpoint_bytes = write_random_safetensors(safetensors_folder, TINY_SHAPE if args.tiny else SHAPES[args.shape])
    write_s = time.perf_counter() - start
    engine_flags = ["--tensor-parallel-size", str(args.tensor_parallel_size), *engine_flags]
    start = time.perf_counter()
    cli = [sys.executable, "-m", "jllm.entrypoints.cli", "convert", safetensors_folder, orbax_folder]
    run([*cli, "--tensor-parallel-size", str(args.tensor_parallel_size), "--dtype", "bfloat16"])
    convert_s = time.perf_counter() - start
    # Read off the flags: asking JAX for the platform here would take the GPUs' memory from
    # the starts to be timed.
    if "--enforce-eager" not in engine_flags:
        start_in_fresh_process(safetensors_folder, engine_flags, drop_caches=False)
    variants = {"safetensors": safetensors_folder, "orbax": orbax_folder}
    starts = {name: [] for name in variants}
    for repeat in range(args.repeats):
        order = list(variants) if repeat % 2 == 0 else list(reversed(variants))
        for name in order:
            starts[name].append(start_in_fresh_process(variants[name], engine_flags, args.drop_caches))
            print(name, starts[name][-1], flush=True)

    def summary(name: str) -> dict:
        runs = starts[name]
        return {
            key: {"median": round(statistics.median(r[key] for r in runs), 3), "all": [round(r[key], 3) for r in runs]}
            for key in ("ready_s", "load_weights_s")
        }

    # bench_utils.run_header's fields, the card's from a start: asking JAX for the devices
    # here would hold the GPUs' memory while the starts run.
    first = starts["safetensors"][0]
    record = {
        "date": datetime.date.today().isoformat(),
        "device": first["device"],
        "jax_version": first["jax_version"],
        "command": " ".join([os.path.basename(__file__), *(argv if argv is not None else sys.argv[1:])]),
        "shape": shape_name,
        "tensor_parallel_size": args.tensor_parallel_size,
        "dtype": "bfloat16",
        "checkpoint_gb": round(checkpoint_bytes / 1e9, 3),
        "page_cache": "dropped before each start" if args.drop_caches else "warm (both folders just written)",
        "write_safetensors_s": round(write_s, 2),
        "convert_s": round(convert_s, 2),
        "repeats": args.repeats,
        **{name: summary(name) for name in variants},
    }
    os.makedirs(args.results_dir, exist_ok=True)
    name = f"startup_{shape_name}_tp{args.tensor_parallel_size}_{record['date']}_{int(time.time())}.json"
    with open(os.path.join(args.results_dir, name), "w") as f:
        json.dump(record, f, indent=1)
    print(json.dumps(record, indent=1))
    return record


if __name__ == "__main__":
    main()
