"""The sections of scripts/bench_kernels.py: shared setup, decode, prefill, KV write, summary."""
