"""One process of a two-process jax.distributed run (tests/distributed/test_multi_process.py):
`python multi_process_llm.py RANK PORT MODEL_FOLDER OUT_JSON ENGINE_ARGS_JSON PROMPTS_JSON`.

Both processes make the same `LLM`; process 0 generates (or, with `"runner": "pooling"`
in ENGINE_ARGS_JSON, embeds) and writes the greedy token ids (the embeddings) to
OUT_JSON; process 1 replays its steps inside `LLM(...)` and exits when process 0 does.
"""

import json
import os
import sys

# Two virtual CPU devices per process, set before jax starts.
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"

from jllm import LLM, SamplingParams  # noqa: E402

rank, port, folder, out_path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
engine_args, prompts = json.loads(sys.argv[5]), json.loads(sys.argv[6])
llm = LLM(
    model=folder,
    dtype="float32",
    skip_tokenizer_init=True,
    nnodes=2,
    node_rank=rank,
    master_addr="127.0.0.1",
    master_port=port,
    **engine_args,
)
assert rank == 0, "only process 0 returns from LLM(...)"
prompts = [{"prompt_token_ids": p} for p in prompts]
if engine_args.get("runner") == "pooling":
    result = [o.outputs.embedding for o in llm.embed(prompts, use_tqdm=False)]
else:
    params = SamplingParams(temperature=0.0, max_tokens=8, logprobs=2)
    result = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]
with open(out_path, "w") as f:
    json.dump(result, f)
