"""jllm's OpenAI-compatible HTTP server (vLLM's vllm/entrypoints/openai)."""
