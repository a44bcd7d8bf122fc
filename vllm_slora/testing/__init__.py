"""Factories for tests, the demo and the benchmarks: tiny or real-shape Llama
folders, random PEFT adapters, and a runner that pushes a token-id workload
through ``vllm.LLM`` in a fresh process, with or without S-LoRA mode."""
