"""Text that every machine has and the tokenizers that read it, shared by the testbeds and the
evaluation (so neither imports the other).

Modules: `corpus` (pydoc_data topics split into training / held-out text, Debian's license texts),
`tokenizers` (the `encode` / `decode` / `bos_id` interface, a byte tokenizer, a Hugging Face adapter).
"""
