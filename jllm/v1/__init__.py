"""vLLM's `vllm.v1` module paths, for programs that import from them (`jllm.v1.metrics.reader`)."""
