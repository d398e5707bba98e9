"""vLLM's six basic offline programs (examples/offline_inference/basic/: generate, chat,
embed, classify, score, reward) run with only `vllm` replaced by `jllm` in their imports:
each is written as vLLM's is, saved as a script and run as __main__ with command-line
flags, on the models this repo can build (tiny random-weight HF folders, and the real
all-MiniLM-L6-v2 for embed)."""

import runpy
import sys

import pytest
from hf_encoder_models import save_tiny_encoder
from pooling_models import save_qwen2_reward_model, save_sequence_classifier

from jllm.models.loader.default_model import get_default_embedding_model_path
from jllm.models.loader.gguf_loader import load_gguf_tokenizer

# The examples' own helper module (examples/offline_inference/basic/utils.py), which chat.py imports.
EXAMPLE_UTILS = """
from argparse import Namespace

from jllm import SamplingParams
from jllm.utils import FlexibleArgumentParser


def add_sampling_params_args(parser: FlexibleArgumentParser) -> FlexibleArgumentParser:
    sampling_params = SamplingParams()
    parser.add_argument("--max-tokens", type=int, default=sampling_params.max_tokens)
    parser.add_argument("--temperature", type=float, default=sampling_params.temperature)
    parser.add_argument("--top-p", type=float, default=sampling_params.top_p)
    parser.add_argument("--top-k", type=int, default=sampling_params.top_k)
    return parser


def del_sampling_params_args(args: Namespace) -> Namespace:
    del args.max_tokens
    del args.temperature
    del args.top_p
    del args.top_k
    return args
"""

GENERATE = """
from jllm import LLM, EngineArgs
from jllm.utils import FlexibleArgumentParser


def main(args: dict):
    max_tokens = args.pop("max_tokens")
    temperature = args.pop("temperature")
    top_p = args.pop("top_p")
    top_k = args.pop("top_k")
    llm = LLM(**args)
    sampling_params = llm.get_default_sampling_params()
    if max_tokens is not None:
        sampling_params.max_tokens = max_tokens
    if temperature is not None:
        sampling_params.temperature = temperature
    if top_p is not None:
        sampling_params.top_p = top_p
    if top_k is not None:
        sampling_params.top_k = top_k
    prompts = [
        "Hello, my name is",
        "The president of the United States is",
        "The capital of France is",
        "The future of AI is",
    ]
    outputs = llm.generate(prompts, sampling_params)
    for output in outputs:
        prompt = output.prompt
        generated_text = output.outputs[0].text
        print(f"Prompt: {prompt!r}, Generated text: {generated_text!r}")


if __name__ == "__main__":
    parser = FlexibleArgumentParser()
    engine_group = parser.add_argument_group("Engine arguments")
    EngineArgs.add_cli_args(engine_group)
    engine_group.set_defaults(model="meta-llama/Llama-3.2-1B-Instruct")
    sampling_group = parser.add_argument_group("Sampling parameters")
    sampling_group.add_argument("--max-tokens", type=int)
    sampling_group.add_argument("--temperature", type=float)
    sampling_group.add_argument("--top-p", type=float)
    sampling_group.add_argument("--top-k", type=int)
    args: dict = vars(parser.parse_args())
    main(args)
"""

CHAT = """
from argparse import Namespace

from utils import add_sampling_params_args, del_sampling_params_args

from jllm import LLM, EngineArgs, SamplingParams
from jllm.utils import FlexibleArgumentParser


def main(args: Namespace):
    chat_template_path = args.chat_template_path
    del args.chat_template_path
    sampling_params = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k
    )
    args = del_sampling_params_args(args)
    llm = LLM(**vars(args))

    def print_outputs(outputs):
        for output in outputs:
            print(f"Prompt: {output.prompt!r}")
            print(f"Generated text: {output.outputs[0].text!r}")
        print("-" * 80)

    conversation = [
        {"role": "system", "content": "You are a helpful assistant"},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hello! How can I assist you today?"},
        {"role": "user", "content": "Write an essay about the importance of higher education."},
    ]
    outputs = llm.chat(conversation, sampling_params, use_tqdm=False)
    print_outputs(outputs)
    conversations = [conversation for _ in range(10)]
    outputs = llm.chat(conversations, sampling_params, use_tqdm=True)
    print_outputs(outputs)
    if chat_template_path:
        with open(chat_template_path) as f:
            chat_template = f.read()
        outputs = llm.chat(conversations, sampling_params, use_tqdm=False, chat_template=chat_template)


if __name__ == "__main__":
    parser = FlexibleArgumentParser()
    parser = EngineArgs.add_cli_args(parser)
    parser = add_sampling_params_args(parser)
    parser.set_defaults(model="meta-llama/Llama-3.2-1B-Instruct")
    parser.add_argument("--chat-template-path", type=str, default=None)
    args = parser.parse_args()
    main(args)
"""

# embed, classify and reward share vLLM's shape: prompts through one pooling method, printed trimmed.
POOLING = """
from argparse import Namespace

from jllm import LLM, EngineArgs
from jllm.utils.argparse_utils import FlexibleArgumentParser


def parse_args():
    parser = FlexibleArgumentParser()
    parser = EngineArgs.add_cli_args(parser)
    parser.set_defaults(model="{default_model}", runner="pooling", enforce_eager=True)
    return parser.parse_args()


def main(args: Namespace):
    prompts = [
        "Hello, my name is",
        "The president of the United States is",
        "The capital of France is",
        "The future of AI is",
    ]
    llm = LLM(**vars(args))
    outputs = llm.{method}(prompts)
    print("\\nGenerated Outputs:\\n" + "-" * 60)
    for prompt, output in zip(prompts, outputs):
        values = output.outputs.{field}
        trimmed = (str(values[:16])[:-1] + ", ...]") if len(values) > 16 else values
        print(f"Prompt: {{prompt!r}} \\n{label}: {{trimmed}} (size={{len(values)}})")
        print("-" * 60)


if __name__ == "__main__":
    args = parse_args()
    main(args)
"""

SCORE = """
from argparse import Namespace

from jllm import LLM, EngineArgs
from jllm.utils.argparse_utils import FlexibleArgumentParser


def parse_args():
    parser = FlexibleArgumentParser()
    parser = EngineArgs.add_cli_args(parser)
    parser.set_defaults(model="BAAI/bge-reranker-v2-m3", runner="pooling", enforce_eager=True)
    return parser.parse_args()


def main(args: Namespace):
    text_1 = "What is the capital of France?"
    texts_2 = [
        "The capital of Brazil is Brasilia.",
        "The capital of France is Paris.",
    ]
    llm = LLM(**vars(args))
    outputs = llm.score(text_1, texts_2)
    print("\\nGenerated Outputs:\\n" + "-" * 60)
    for text_2, output in zip(texts_2, outputs):
        score = output.outputs.score
        print(f"Pair: {[text_1, text_2]!r} \\nScore: {score}")
        print("-" * 60)


if __name__ == "__main__":
    args = parse_args()
    main(args)
"""

COMMON_FLAGS = ["--dtype", "float32", "--max-model-len", "256", "--seed", "0"]


def _run(tmp_path, name: str, source: str, flags: list[str], capsys) -> str:
    (tmp_path / "utils.py").write_text(EXAMPLE_UTILS)
    script = tmp_path / f"{name}.py"
    script.write_text(source)
    argv, path = sys.argv, list(sys.path)
    sys.argv = [str(script), *flags]
    sys.path.insert(0, str(tmp_path))
    sys.modules.pop("utils", None)
    try:
        runpy.run_path(str(script), run_name="__main__")
    finally:
        sys.argv, sys.path[:] = argv, path
        sys.modules.pop("utils", None)
    return capsys.readouterr().out


@pytest.fixture(scope="module")
def tokenizer(smollm2_gguf_path):
    return load_gguf_tokenizer(smollm2_gguf_path)


def test_generate(tmp_path, tiny_llama_path, capsys):
    out = _run(tmp_path, "generate", GENERATE, ["--model", tiny_llama_path, *COMMON_FLAGS, "--max-tokens", "8"], capsys)
    lines = [line for line in out.splitlines() if line.startswith("Prompt: ")]
    assert len(lines) == 4 and lines[0].startswith("Prompt: 'Hello, my name is', Generated text: '")


def test_chat(tmp_path, tiny_llama_path, capsys):
    flags = ["--model", tiny_llama_path, *COMMON_FLAGS, "--max-tokens", "4", "--temperature", "0"]
    out = _run(tmp_path, "chat", CHAT, flags, capsys)
    assert out.count("Generated text: ") == 11
    assert out.count("-" * 80) == 2


def test_embed(tmp_path, capsys):
    source = POOLING.format(default_model="intfloat/e5-small", method="embed", field="embedding", label="Embeddings")
    out = _run(tmp_path, "embed", source, ["--model", get_default_embedding_model_path(), "--seed", "0"], capsys)
    assert out.count("(size=384)") == 4
    assert "Prompt: 'Hello, my name is' \nEmbeddings: [" in out


def test_classify(tmp_path, tokenizer, capsys):
    folder = save_sequence_classifier("Qwen2ForSequenceClassification", str(tmp_path / "m"), tokenizer, num_labels=2)
    source = POOLING.format(
        default_model="jason9693/Qwen2.5-1.5B-apeach", method="classify", field="probs", label="Class Probabilities"
    )
    out = _run(tmp_path, "classify", source, ["--model", folder, *COMMON_FLAGS], capsys)
    assert out.count("(size=2)") == 4


def test_score(tmp_path, capsys):
    folder = save_tiny_encoder("XLMRobertaForSequenceClassification", str(tmp_path / "m"), num_labels=1)
    out = _run(tmp_path, "score", SCORE, ["--model", folder, *COMMON_FLAGS], capsys)
    scores = [float(line.split("Score: ")[1]) for line in out.splitlines() if line.startswith("Score: ")]
    assert len(scores) == 2 and all(0.0 < s < 1.0 for s in scores)


def test_reward(tmp_path, tokenizer, capsys):
    folder = save_qwen2_reward_model(str(tmp_path / "m"), tokenizer)
    source = POOLING.format(
        default_model="internlm/internlm2-1_8b-reward", method="reward", field="data", label="Reward"
    )
    out = _run(tmp_path, "reward", source, ["--model", folder, *COMMON_FLAGS, "--trust-remote-code"], capsys)
    assert out.count("Reward: ") == 4 and "(size=" in out
