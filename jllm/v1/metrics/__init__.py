"""vLLM's `vllm.v1.metrics`: engine metrics read back in-process."""
