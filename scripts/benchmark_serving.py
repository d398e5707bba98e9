"""Online serving benchmark in the manner of `vllm bench serve`: a random dataset of
token-id prompts sent as streaming completions at a request rate (Poisson, with
burstiness) under a concurrency cap; TTFT, TPOT, ITL and end-to-end latency
percentiles, request and token throughput.

One command on a GPU machine starts the server itself, on a dummy-weight model of a
real shape (no tokenizer: prompts are token ids), then benchmarks it:

    python scripts/benchmark_serving.py --launch-server --shape llama-3.2-1b \
        --num-prompts 500 --random-input-len 1024 --random-output-len 128 \
        --request-rate inf --max-concurrency 64 [server flags, e.g. --max-num-seqs 256]

or benchmark a server that is already running:

    python scripts/benchmark_serving.py --base-url http://127.0.0.1:8000 --model NAME --vocab-size 128256 ...

Flags this script does not know are passed to the server it launches. The client is
the standard library only (asyncio streams), so it runs wherever Python does; results
go to scripts/results/serving_<label>_<date>_<time>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import importlib.util
import json
import os
import random
import shlex
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from urllib.parse import urlsplit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from scripts.model_shapes import SHAPES, write_shape  # noqa: E402

SERVER_PACKAGES = ("jax", "fastapi", "uvicorn", "pydantic", "prometheus_client")


# ----- the dataset and the request schedule ---------------------------------------------


@dataclass
class SampleRequest:
    prompt_token_ids: list[int]
    output_len: int


def random_dataset(
    num_prompts: int, input_len: int, output_len: int, range_ratio: float, vocab_size: int, seed: int
) -> list[SampleRequest]:
    """vLLM's RandomDataset, on token ids: lengths uniform in [len*(1-r), len*(1+r)]."""
    rng = random.Random(seed)

    def length(mean: int) -> int:
        return max(1, rng.randint(int(mean * (1 - range_ratio)), int(mean * (1 + range_ratio))))

    return [
        SampleRequest([rng.randrange(vocab_size) for _ in range(length(input_len))], length(output_len))
        for _ in range(num_prompts)
    ]


async def request_schedule(requests: list[SampleRequest], request_rate: float, burstiness: float, seed: int):
    """Yields requests with gamma-distributed gaps (Poisson when burstiness is 1)."""
    rng = random.Random(seed + 1)
    for request in requests:
        yield request
        if request_rate != float("inf"):
            await asyncio.sleep(rng.gammavariate(burstiness, 1.0 / (request_rate * burstiness)))


# ----- one streaming request over a raw HTTP/1.1 connection -----------------------------


@dataclass
class RequestResult:
    prompt_len: int
    success: bool = False
    output_tokens: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    error: str = ""


async def _read_body_chunks(reader: asyncio.StreamReader, chunked: bool):
    if not chunked:
        while data := await reader.read(65536):
            yield data
        return
    while True:
        size = int((await reader.readline()).split(b";")[0].strip() or b"0", 16)
        if size == 0:
            return
        yield await reader.readexactly(size)
        await reader.readexactly(2)


async def stream_completion(
    base_url: str, api_key: str | None, model: str, request: SampleRequest, temperature: float
) -> RequestResult:
    """POST /v1/completions with stream=true; times each SSE event as it arrives."""
    url = urlsplit(base_url)
    body = json.dumps(
        {
            "model": model,
            "prompt": request.prompt_token_ids,
            "max_tokens": request.output_len,
            "temperature": temperature,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    ).encode()
    head = (
        f"POST {url.path.rstrip('/')}/v1/completions HTTP/1.1\r\nHost: {url.netloc}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nAccept: text/event-stream\r\n"
        + (f"Authorization: Bearer {api_key}\r\n" if api_key else "")
        + "Connection: close\r\n\r\n"
    )
    result = RequestResult(prompt_len=len(request.prompt_token_ids))
    start = time.perf_counter()
    writer = None
    try:
        reader, writer = await asyncio.open_connection(url.hostname, url.port or 80, limit=1 << 22)
        writer.write(head.encode() + body)
        await writer.drain()
        status = (await reader.readline()).decode("latin-1").split(" ", 2)
        headers = {}
        while (line := await reader.readline()) not in (b"\r\n", b""):
            key, _, value = line.decode("latin-1").partition(":")
            headers[key.strip().lower()] = value.strip()
        chunked = headers.get("transfer-encoding", "").lower() == "chunked"
        if len(status) < 2 or status[1] != "200":
            error = b"".join([c async for c in _read_body_chunks(reader, chunked)])
            result.error = f"HTTP {' '.join(status[1:]).strip()}: {error.decode(errors='replace')[:500]}"
            return result
        buffer, last = b"", start
        async for data in _read_body_chunks(reader, chunked):
            buffer += data
            while b"\n\n" in buffer:
                event, buffer = buffer.split(b"\n\n", 1)
                payload = event.decode().removeprefix("data: ").strip()
                if payload == "[DONE]":
                    continue
                chunk = json.loads(payload)
                if "error" in chunk:
                    result.error = json.dumps(chunk["error"])
                    return result
                now = time.perf_counter()
                if chunk.get("choices"):
                    if not result.ttft:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
                elif chunk.get("usage"):
                    result.output_tokens = chunk["usage"]["completion_tokens"]
        result.latency = time.perf_counter() - start
        result.success = result.ttft > 0 and result.output_tokens > 0
        if not result.success:
            result.error = "The stream ended without tokens or usage."
    except (OSError, asyncio.IncompleteReadError, ValueError) as e:
        result.error = f"{type(e).__name__}: {e}"
    finally:
        if writer is not None:
            writer.close()
    return result


# ----- the benchmark --------------------------------------------------------------------


def _stats(values_s: list[float], percentiles: list[float], name: str) -> dict:
    """mean/median/std and percentiles in milliseconds (vLLM's field names)."""
    if not values_s:
        return {}
    ms = sorted(v * 1000 for v in values_s)
    mean = sum(ms) / len(ms)
    out = {
        f"mean_{name}_ms": mean,
        f"median_{name}_ms": _percentile(ms, 50),
        f"std_{name}_ms": (sum((v - mean) ** 2 for v in ms) / len(ms)) ** 0.5,
    }
    for p in percentiles:
        out[f"p{p:g}_{name}_ms"] = _percentile(ms, p)
    return out


def _percentile(sorted_values: list[float], p: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    k = (len(sorted_values) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


async def run_benchmark(args, requests: list[SampleRequest]) -> dict:
    temperature = args.temperature
    print("Starting initial single prompt test run...")
    test = await stream_completion(args.base_url, args.api_key, args.model, requests[0], temperature)
    if not test.success:
        raise SystemExit(f"The initial test request failed: {test.error}")
    for warm in requests[: args.num_warmups]:
        await stream_completion(args.base_url, args.api_key, args.model, warm, temperature)

    semaphore = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None

    async def limited(request: SampleRequest) -> RequestResult:
        if semaphore is None:
            return await stream_completion(args.base_url, args.api_key, args.model, request, temperature)
        async with semaphore:
            return await stream_completion(args.base_url, args.api_key, args.model, request, temperature)

    before = scrape_metrics(args.base_url)
    print(
        f"Traffic request rate: {args.request_rate}, burstiness: {args.burstiness}, "
        f"max concurrency: {args.max_concurrency}"
    )
    start = time.perf_counter()
    tasks = [
        asyncio.create_task(limited(r))
        async for r in request_schedule(requests, args.request_rate, args.burstiness, args.seed)
    ]
    results = await asyncio.gather(*tasks)
    duration = time.perf_counter() - start
    after = scrape_metrics(args.base_url)
    return summarize(args, results, duration, before, after)


def summarize(args, results: list[RequestResult], duration: float, before: dict, after: dict) -> dict:
    ok = [r for r in results if r.success]
    total_input = sum(r.prompt_len for r in ok)
    total_output = sum(r.output_tokens for r in ok)
    percentiles = [float(p) for p in args.metric_percentiles.split(",")]
    tpots = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    record = {
        "date": datetime.date.today().isoformat(),
        "command": " ".join(shlex.quote(a) for a in sys.argv),
        "base_url": args.base_url,
        "model": args.model,
        "label": args.label,
        "num_prompts": args.num_prompts,
        "random_input_len": args.random_input_len,
        "random_output_len": args.random_output_len,
        "random_range_ratio": args.random_range_ratio,
        "request_rate": args.request_rate if args.request_rate != float("inf") else "inf",
        "burstiness": args.burstiness,
        "max_concurrency": args.max_concurrency,
        "duration": duration,
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "total_input_tokens": total_input,
        "total_output_tokens": total_output,
        "request_throughput": len(ok) / duration,
        "output_throughput": total_output / duration,
        "total_token_throughput": (total_input + total_output) / duration,
        **_stats([r.ttft for r in ok], percentiles, "ttft"),
        **_stats(tpots, percentiles, "tpot"),
        **_stats([x for r in ok for x in r.itl], percentiles, "itl"),
        **_stats([r.latency for r in ok], percentiles, "e2el"),
        "errors": sorted({r.error for r in results if not r.success})[:10],
    }
    for name in ("vllm:num_preemptions_total", "vllm:generation_tokens_total", "vllm:prompt_tokens_total"):
        if name in before and name in after:
            record["server_" + name.split(":")[1]] = after[name] - before[name]
    return record


def print_record(record: dict) -> None:
    print("{s:{c}^60}".format(s=" Serving Benchmark Result ", c="="))
    for key in (
        "completed",
        "failed",
        "duration",
        "total_input_tokens",
        "total_output_tokens",
        "request_throughput",
        "output_throughput",
        "total_token_throughput",
    ):
        print(f"{key:<40} {record[key]:>15.2f}" if isinstance(record[key], float) else f"{key:<40} {record[key]:>15}")
    for metric in ("ttft", "tpot", "itl", "e2el"):
        for key, value in record.items():
            if key.endswith(f"_{metric}_ms"):
                print(f"{key:<40} {value:>15.2f}")
    print("=" * 60)


# ----- the server -----------------------------------------------------------------------


def http_get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, ""


def scrape_metrics(base_url: str) -> dict[str, float]:
    """Unlabelled sums of the server's Prometheus samples (no prometheus_client needed)."""
    try:
        status, text = http_get(f"{base_url}/metrics")
    except OSError:
        return {}
    if status != 200:
        return {}
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            name = name.split("{", 1)[0]
            try:
                values[name] = values.get(name, 0.0) + float(value)
            except ValueError:
                continue
    return values


def missing_server_packages() -> list[str]:
    return [name for name in SERVER_PACKAGES if importlib.util.find_spec(name) is None]


def server_device() -> dict:
    """The launched server's device and JAX version (same machine, same Python), read
    in a subprocess: this client never imports JAX."""
    code = "import jax, json; print(json.dumps([jax.devices()[0].device_kind, jax.__version__]))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        return {"device": None, "jax_version": None}
    device, version = json.loads(out.stdout.strip().splitlines()[-1])
    return {"device": device, "jax_version": version}


def launch_server(args, server_flags: list[str], log_path: str) -> subprocess.Popen:
    missing = missing_server_packages()
    if missing:
        raise SystemExit(
            f"--launch-server needs the Python packages {', '.join(missing)} in {sys.executable}, which are "
            "missing. Install jllm with its dependencies (pip install -e .) on this machine, or benchmark a "
            "server running elsewhere with --base-url."
        )
    if args.model_path is None:
        folder = write_shape(args.shape, tempfile.mkdtemp(prefix="jllm_shape_"))
        server_flags = ["--load-format", "dummy", "--skip-tokenizer-init", *server_flags]
    else:
        folder = args.model_path
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args.base_url = f"http://127.0.0.1:{port}"
    cmd = [
        sys.executable,
        "-m",
        "jllm.entrypoints.openai.api_server",
        "--model",
        folder,
        "--served-model-name",
        args.model,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--disable-uvicorn-access-log",
        *server_flags,
    ]
    args.server_command = " ".join(shlex.quote(c) for c in cmd)
    print(f"Launching the server (log: {log_path}):\n  {args.server_command}")
    log = open(log_path, "w")
    proc = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )
    deadline = time.monotonic() + args.server_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"The server exited with code {proc.returncode}; its log:\n{_tail(log_path)}")
        try:
            if http_get(f"{args.base_url}/health", timeout=2)[0] == 200:
                return proc
        except OSError:
            pass
        time.sleep(1)
    stop_server(proc)
    raise SystemExit(f"The server was not healthy after {args.server_timeout} s; its log:\n{_tail(log_path)}")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _tail(path: str, lines: int = 40) -> str:
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-lines:])


def _raise_open_file_limit() -> None:
    """Every in-flight request holds a socket; the default soft limit is often 1024."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, ValueError, OSError):
        pass


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    target = parser.add_argument_group("the server")
    target.add_argument(
        "--launch-server",
        action="store_true",
        help="Start `python -m jllm.entrypoints.openai.api_server` and stop it afterwards.",
    )
    target.add_argument("--base-url", default=None, help="A running server, e.g. http://127.0.0.1:8000.")
    target.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"))
    target.add_argument("--model", default=None, help="The served model name (default: the shape's name).")
    target.add_argument(
        "--shape",
        choices=sorted(SHAPES),
        default="llama-3.2-1b",
        help="With --launch-server: dummy weights at this model's shape.",
    )
    target.add_argument(
        "--model-path", default=None, help="With --launch-server: serve this model folder instead of a dummy shape."
    )
    target.add_argument(
        "--vocab-size",
        type=int,
        default=None,
        help="Prompt token ids are drawn below this (default: the shape's or model's vocab).",
    )
    target.add_argument("--server-timeout", type=float, default=1800, help="Seconds to wait for the server.")
    load = parser.add_argument_group("the load")
    load.add_argument("--num-prompts", type=int, default=1000)
    load.add_argument("--random-input-len", type=int, default=1024)
    load.add_argument("--random-output-len", type=int, default=128)
    load.add_argument("--random-range-ratio", type=float, default=0.0)
    load.add_argument("--request-rate", type=float, default=float("inf"), help="Requests/s; inf sends all at once.")
    load.add_argument("--burstiness", type=float, default=1.0, help="Gamma shape of the gaps; 1 is Poisson.")
    load.add_argument("--max-concurrency", type=int, default=None)
    load.add_argument("--num-warmups", type=int, default=0, help="Untimed requests before the run.")
    load.add_argument("--temperature", type=float, default=0.0)
    load.add_argument("--seed", type=int, default=0)
    load.add_argument("--metric-percentiles", default="50,90,99")
    load.add_argument("--label", default=None, help="Names the result file (default: the shape or model).")
    load.add_argument("--result-dir", default=os.path.join(ROOT, "scripts", "results"))
    args, server_flags = parser.parse_known_args(argv)
    if server_flags and not args.launch_server:
        parser.error(f"unrecognized arguments: {' '.join(server_flags)}")
    if args.launch_server == (args.base_url is not None):
        parser.error("give exactly one of --launch-server and --base-url")
    args.model = args.model or (os.path.basename(args.model_path.rstrip("/")) if args.model_path else args.shape)
    if args.vocab_size is None:
        if args.model_path is not None:
            with open(os.path.join(args.model_path, "config.json")) as f:
                args.vocab_size = json.load(f)["vocab_size"]
        elif args.launch_server:
            args.vocab_size = SHAPES[args.shape]["vocab_size"]
        else:
            parser.error("--vocab-size is needed with --base-url (prompts are random token ids)")
    args.label = args.label or args.model
    return args, server_flags


def main(argv: list[str] | None = None) -> dict:
    args, server_flags = parse_args(argv)
    _raise_open_file_limit()
    os.makedirs(args.result_dir, exist_ok=True)
    args.server_command = None
    proc = None
    if args.launch_server:
        proc = launch_server(args, server_flags, os.path.join(tempfile.mkdtemp(prefix="jllm_serve_"), "server.log"))
    try:
        requests = random_dataset(
            args.num_prompts,
            args.random_input_len,
            args.random_output_len,
            args.random_range_ratio,
            args.vocab_size,
            args.seed,
        )
        record = asyncio.run(run_benchmark(args, requests))
    finally:
        if proc is not None:
            stop_server(proc)
    record["server_command"] = args.server_command
    if args.launch_server:
        record.update(server_device())
    print_record(record)
    stamp = int(time.time())
    path = os.path.join(args.result_dir, f"serving_{args.label.replace('/', '_')}_{record['date']}_{stamp}.json")
    with open(path, "w") as f:
        json.dump(record, f, indent=1)
    print(f"Results written to {path}")
    return record


if __name__ == "__main__":
    main()
