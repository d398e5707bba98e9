"""Pooling on the GPU against HF transformers with the same random weights, in 16-bit:
jllm's embeddings (cuDNN attention over the packed sequences) of texts of mixed lengths
against HF's pooled hidden states, by cosine similarity.

    python scripts/check_pooling_parity.py --shape bert-base --dtype float16

The HF model is built from the shape's config with random weights and saved; jllm loads
the saved folder. Prints the worst cosine and writes a JSON record under scripts/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from scripts.bench_utils import run_header  # noqa: E402
from scripts.model_shapes import SHAPES, write_shape  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shape", choices=["bert-base", "qwen3-0.6b"], default="bert-base")
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--num-texts", type=int, default=64)
    parser.add_argument("--results-dir", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args()
    import torch
    from transformers import AutoConfig, AutoModel

    folder = write_shape(args.shape, tempfile.mkdtemp(prefix="jllm_parity_"))
    config = AutoConfig.from_pretrained(folder)
    torch.manual_seed(0)
    model = AutoModel.from_config(config, dtype=torch.float32)
    model.save_pretrained(folder)
    model = model.to(getattr(torch, args.dtype)).cuda().eval()
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 500, args.num_texts)
    texts = [rng.integers(1000, SHAPES[args.shape]["vocab_size"], n).tolist() for n in lengths]
    mean = config.model_type == "bert"
    expected = []
    with torch.inference_mode():
        for ids in texts:
            hidden = model(input_ids=torch.tensor([ids]).cuda()).last_hidden_state[0].float()
            pooled = hidden.mean(0) if mean else hidden[-1]
            expected.append(torch.nn.functional.normalize(pooled, dim=-1).cpu().numpy())
    del model
    torch.cuda.empty_cache()

    from jllm import LLM

    llm = LLM(
        model=folder,
        runner="pooling",
        dtype=args.dtype,
        skip_tokenizer_init=True,
        max_model_len=512,
        pooler_config={"pooling_type": "MEAN" if mean else "LAST", "normalize": True},
    )
    outputs = llm.embed([{"prompt_token_ids": t} for t in texts], use_tqdm=False)
    cosines = [float(np.dot(o.outputs.embedding, e)) for o, e in zip(outputs, expected)]

    record = {
        **run_header(),
        "shape": args.shape,
        "dtype": args.dtype,
        "num_texts": args.num_texts,
        "min_cosine": round(min(cosines), 6),
        "mean_cosine": round(float(np.mean(cosines)), 6),
    }
    os.makedirs(args.results_dir, exist_ok=True)
    with open(os.path.join(args.results_dir, f"pooling_parity_{args.shape}_{int(time.time())}.json"), "w") as f:
        json.dump(record, f, indent=1)
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
